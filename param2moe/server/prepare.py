"""From a request body to the engine's work: prompts tokenized (on a worker thread when long) and checked
in one place (`ServerState.check_prompt`), and each request's SamplingParams built in one place
(`sampling_params`), which is where further per-request sampling options belong."""

from __future__ import annotations

from dataclasses import dataclass

from ..engine import SamplingParams
from ..lora import LoRARequest
from ..parsers import prompt_ends_in_reasoning
from .chat_input import ChatInput, chat_input, render_chat
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    RequestError,
    SamplingFields,
    check_stream_fields,
    to_sampling_fields,
)
from .serving import ChatContext, CompletionContext, CompletionPrompt, now
from .state import ServerState
from .structured import structured_outputs

_SEED_LIMIT = 1 << 62


@dataclass
class EngineJob:
    """One engine request: its prompt and how to sample it."""

    text: str | None
    token_ids: list[int]
    params: SamplingParams
    request_id: str
    lora_request: LoRARequest | None = None  # the adapter the request names as its model

    @property
    def engine_input(self) -> dict:
        return {"prompt": self.text or None, "prompt_token_ids": self.token_ids}


def sampling_params(st: ServerState, req: SamplingFields, *, num_prompt: int, field: str,
                    requested_max_tokens: int | None, logprobs: int | None, extra_stop_ids=(),
                    structured=None) -> SamplingParams:
    """The SamplingParams of one prompt of a request: its fields over the model's defaults, within the
    server's limits; structured: the request's compiled constraint (server/structured.py), or None."""
    max_tokens = st.max_tokens(requested_max_tokens, num_prompt, field)
    f = to_sampling_fields(req, st.defaults, st.vocab_size, logprobs=logprobs, max_tokens=max_tokens)
    f["structured_outputs"] = structured
    if f["n"] > st.max_num_seqs:
        raise RequestError(f"n={f['n']}: at most {st.max_num_seqs} (--max-num-seqs)", "n")
    if f["seed"] is not None and not -_SEED_LIMIT <= f["seed"] < _SEED_LIMIT:
        raise RequestError(f"seed={f['seed']}: must be in [-2^62, 2^62)", "seed")
    if f["top_k"] is not None and f["top_k"] > st.vocab_size:
        f["top_k"] = -1  # no limit
    if extra_stop_ids and not f["ignore_eos"]:
        f["stop_token_ids"] = list(f["stop_token_ids"]) + [t for t in extra_stop_ids
                                                         if t not in f["stop_token_ids"]]
    try:
        return SamplingParams(**f)
    except (ValueError, TypeError) as e:
        msg = str(e)
        param = msg.split("=", 1)[0] if "=" in msg.split(":", 1)[0] else None
        raise RequestError(msg, param) from None


def _check_common(st: ServerState, req: SamplingFields) -> tuple[LoRARequest | None, str]:
    """(the adapter the request names as its model, or None, and the model name its replies carry)."""
    lora = st.resolve_model(req.model)
    st.check_accepting()
    check_stream_fields(req)
    return lora, lora.lora_name if lora else st.model_name


async def encode_chat(st: ServerState, chat: ChatInput, add_special_tokens: bool) -> tuple[str, list[int]]:
    """The chat's prompt text and its tokens."""
    def work():
        text = render_chat(st.tokenizer, chat)
        return text, st.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    st.need_tokenizer()
    return await st.off_loop(work, size=chat.size)


async def prepare_chat(st: ServerState, req: ChatCompletionRequest, request_id: str
                       ) -> tuple[ChatContext, list[EngineJob]]:
    lora, model_name = _check_common(st, req)
    if req.top_logprobs is not None and not req.logprobs:
        raise RequestError("top_logprobs: needs logprobs=true", "top_logprobs")
    st.need_tokenizer()
    chat = chat_input(req.messages, req.tools, req.tool_choice, add_generation_prompt=req.add_generation_prompt,
                      continue_final_message=req.continue_final_message, template_kwargs=req.chat_template_kwargs)
    text, ids = await encode_chat(st, chat, req.add_special_tokens)
    st.check_prompt(ids, "messages")
    top = (req.top_logprobs or 0) if req.logprobs else None
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    so = await structured_outputs(st, req, prompt=text, tools=chat.tools if chat.parse_tools else None)
    params = sampling_params(st, req, num_prompt=len(ids), field="messages", requested_max_tokens=requested,
                             logprobs=top, extra_stop_ids=st.chat_stop_ids, structured=so)
    opts = req.stream_options
    ctx = ChatContext(request_id, model_name, now(), n=params.n, num_prompt_tokens=len(ids),
                      start_in_reasoning=prompt_ends_in_reasoning(text), parse_tools=chat.parse_tools,
                      top_logprobs=top, include_usage=bool(opts and opts.include_usage),
                      continuous_usage=bool(opts and opts.continuous_usage_stats),
                      hidden_stop_ids=frozenset(st.chat_stop_ids), token_text=st.token_text,
                      prompt_logprobs=req.prompt_logprobs is not None)
    return ctx, [EngineJob(text, ids, params, request_id, lora)]


async def completion_prompts(st: ServerState, req: CompletionRequest) -> list[CompletionPrompt]:
    """The request's prompts, tokenized (or, given as ids, decoded for echo) and checked."""
    raw = req.prompt
    if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
        raw = [raw]
    if not raw:
        raise RequestError("prompt: empty", "prompt")
    if any(isinstance(p, str) for p in raw):
        st.need_tokenizer()
    tok = st.tokenizer

    def work() -> list[CompletionPrompt]:
        out = []
        for p in raw:
            if isinstance(p, str):
                out.append(CompletionPrompt(p, tok.encode(p, add_special_tokens=req.add_special_tokens)))
            else:
                text = tok.decode(p, skip_special_tokens=False) if (tok and req.echo) else ""
                out.append(CompletionPrompt(text, list(p)))
        return out

    prompts = await st.off_loop(work, size=sum(len(p) for p in raw))
    for p in prompts:
        st.check_prompt(p.token_ids, "prompt")
    return prompts


async def prepare_completion(st: ServerState, req: CompletionRequest, request_id: str
                             ) -> tuple[CompletionContext, list[EngineJob]]:
    lora, model_name = _check_common(st, req)
    if req.suffix:
        raise RequestError("suffix: not supported", "suffix")
    prompts = await completion_prompts(st, req)
    want_prompt_logprobs = req.prompt_logprobs is not None
    if req.logprobs is not None and req.echo and req.prompt_logprobs is None:
        req = req.model_copy(update={"prompt_logprobs": req.logprobs})  # echo shows the prompt's logprobs
    so = await structured_outputs(st, req)
    jobs = []
    for k, p in enumerate(prompts):
        params = sampling_params(st, req, num_prompt=len(p.token_ids), field="prompt",
                                 requested_max_tokens=req.max_tokens, logprobs=req.logprobs, structured=so)
        jobs.append(EngineJob(p.text, p.token_ids, params, f"{request_id}-{k}", lora))
    opts = req.stream_options
    ctx = CompletionContext(request_id, model_name, now(), prompts, n=jobs[0].params.n, logprobs=req.logprobs,
                            echo=bool(req.echo), include_usage=bool(opts and opts.include_usage),
                            continuous_usage=bool(opts and opts.continuous_usage_stats), token_text=st.token_text,
                            prompt_logprobs=want_prompt_logprobs)
    return ctx, jobs
