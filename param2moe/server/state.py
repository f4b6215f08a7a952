"""What the server knows and holds: its options, the model's facts (read from the engine, its tokenizer
and checkpoint), the request limits and the count of sequences admitted. One ServerState per app, at
`app.state.server`."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from ..engine.async_engine import AsyncLLMEngine
from ..engine.config import default_max_tokens, sampling_defaults
from .lora import ServedAdapters
from .metrics import ServerMetrics
from .options import ServerOptions
from .protocol import RequestError
from .response_common import TokenText, now

# Text longer than this is tokenized (or a chat rendered) on a worker thread, so that the event loop
# (health checks, every stream) does not wait for it; shorter text is quicker to do in place.
_INLINE_CHARS = 32 << 10


class ServerState:
    def __init__(self, async_engine: AsyncLLMEngine, options: ServerOptions):
        engine = async_engine.engine
        self.async_engine, self.engine, self.options = async_engine, engine, options
        self.tokenizer = engine.tokenizer
        model_dir = engine.config.model
        self.model_name = options.served_model_name or engine.config.model_name
        self.model_root = model_dir or ""
        self.max_model_len = engine.max_model_len
        self.vocab_size = engine.model_config.vocab_size
        self.max_num_seqs = engine.config.max_num_seqs
        self.defaults = sampling_defaults(engine.generation_config)
        self.default_max_tokens = default_max_tokens(engine.generation_config)
        self.metrics = ServerMetrics(async_engine, self.model_name)
        self.adapters = ServedAdapters(async_engine, self.model_name)
        self.token_text = TokenText(self.tokenizer)
        self.created = now()
        self.pending_seqs = 0
        self.draining = False
        # The chat's end of turn stops a reply even where the checkpoint does not list it as an EOS id.
        eot = self.tokenizer.end_of_turn_id if self.tokenizer else None
        self.chat_stop_ids = [eot] if eot is not None and eot not in engine.eos_token_ids else []
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="p2m-tokenize")

    def model_cards(self) -> list[dict]:
        """The base model's card, then each LoRA adapter's (its parent: the base model)."""
        base = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "param2moe",
                "root": self.model_root, "parent": None, "max_model_len": self.max_model_len}
        return [base, *self.adapters.cards(self.created, self.max_model_len)]

    # ------------------------------------------------------------------ work off the event loop
    async def off_loop(self, fn, *args, size: int = 0):
        """fn(*args), on a worker thread when size (characters of text, tokens) is large."""
        if size <= _INLINE_CHARS:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ checks
    def check_model(self, name: str | None) -> None:
        self.resolve_model(name)

    def resolve_model(self, name: str | None):
        """The LoRA adapter (a LoRARequest) a request's `model` names, None for the base model; 404 for a
        name this server does not serve."""
        lora = self.adapters.lookup(name)
        if lora is None and name is not None and name not in (self.model_name, self.model_root):
            served = ", ".join(f"`{n}`" for n in (self.model_name, *self.adapters.requests))
            raise RequestError(f"The model `{name}` does not exist (this server serves {served}).",
                               "model", status=404, code="model_not_found")
        return lora

    def need_tokenizer(self) -> None:
        if self.tokenizer is None:
            raise RequestError("this model has no tokenizer: give prompts as token ids", "prompt")

    def check_accepting(self) -> None:
        if self.draining:
            self.metrics.count_request("rejected")
            raise RequestError("the server is shutting down", status=503, type="service_unavailable",
                               code="shutting_down")

    @property
    def capacity(self) -> int:
        """Sequences the server holds at most: max_num_seqs running and max_queued_requests waiting."""
        return self.max_num_seqs + self.options.max_queued_requests

    def admit(self, n: int, field: str) -> None:
        """Take n sequences' worth of room, or refuse: with 400 when n could never fit, 503 when the queue
        is full now."""
        self.check_accepting()
        queued_room = self.options.max_queued_requests
        if n > self.capacity:
            raise RequestError(f"{field}: this request needs {n} sequences, more than the server ever holds "
                               f"({self.capacity}: --max-num-seqs {self.max_num_seqs} running and "
                               f"--max-queued-requests {queued_room} waiting)", field)
        # The engine's own queue (sequences that wait for KV-cache room) may not grow past the limit either.
        if self.pending_seqs + n > self.capacity or self.async_engine.num_waiting >= queued_room > 0:
            self.metrics.count_request("rejected")
            raise RequestError(f"too many requests waiting (--max-queued-requests {queued_room}); retry later",
                               status=503, type="service_unavailable", code="queue_full")
        self.pending_seqs += n

    def release(self, n: int) -> None:
        self.pending_seqs -= n

    def check_prompt(self, ids: list[int], field: str) -> None:
        """The one check of every prompt's tokens: some, each in the vocabulary, and room left to generate."""
        if not ids:
            raise RequestError(f"{field}: empty (no tokens)", field)
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            bad = next(t for t in ids if not 0 <= t < self.vocab_size)
            raise RequestError(f"{field}: token id {bad} is outside the vocabulary [0, {self.vocab_size})", field)
        if len(ids) >= self.max_model_len:
            raise RequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                f"{field} has {len(ids)} tokens, which leaves no room for a completion. Please reduce the "
                f"length of the {field}.", field, code="context_length_exceeded")

    def max_tokens(self, requested: int | None, num_prompt: int, field: str) -> int:
        """The tokens a completion may have: as requested (if they fit), else the model's default or the
        rest of the context."""
        room = self.max_model_len - num_prompt
        if requested is None:
            return min(room, self.default_max_tokens or room)
        if requested > room:
            raise RequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{num_prompt + requested} tokens ({num_prompt} in the {field}, {requested} in the completion). "
                f"Please reduce the length of the {field} or completion.", field, code="context_length_exceeded")
        return requested
