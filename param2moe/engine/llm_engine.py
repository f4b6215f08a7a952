"""LLMEngine: requests in, one scheduled batch per step(), outputs out.

Owns the tokenizer, the model runner, the block manager and the scheduler. Synchronous; the
asyncio front end (async_engine.py) drives it from a worker thread for the server.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import dataclass

import torch

from ..checkpoint import load_model
from ..config import Param2MoEConfig
from ..tokenizer import Tokenizer
from .block_manager import BlockManager
from .detokenizer import IncrementalDetokenizer, find_stop
from .model_runner import ModelRunner, kv_bytes_per_token
from .outputs import CompletionOutput, RequestOutput
from .sampler import Sampler
from .sampling_params import OutputKind, SamplingParams
from .scheduler import Scheduler
from .sequence import Request, Sequence

log = logging.getLogger("param2moe")

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}


def bundled_model_path() -> str:
    """The small Param2-layout model that ships with the package (random weights)."""
    return os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "param2-small")


@dataclass
class EngineConfig:
    model: str | None = None  # checkpoint directory; None: the bundled small model
    dtype: str = "auto"  # auto: the checkpoint's torch_dtype
    device: str = "auto"  # auto: cuda if available, else cpu
    max_model_len: int | None = None  # None: max_position_embeddings
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes of KV cache; None: 2 GiB on CPU, a share of free memory on GPU
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    seed: int = 0
    load_format: str = "auto"  # "dummy": random weights from config.json (or a preset), no weight files
    preset: str | None = None  # with load_format dummy and no model: a writer preset (e.g. param2-17b)
    uniform_random_routing: bool | None = None  # None: on with dummy weights (SPEC 7)

    def resolve(self) -> EngineConfig:
        if self.model is None and self.preset is None:
            self.model = bundled_model_path()
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.uniform_random_routing is None:
            self.uniform_random_routing = self.load_format == "dummy"
        return self


class EngineError(ValueError):
    """A request the engine cannot take; the message says which field and why."""


class LLMEngine:
    def __init__(self, config: EngineConfig, shard=None):
        cfg = self.config = config.resolve()
        torch.manual_seed(cfg.seed)
        if cfg.model is not None:
            self.model_config = Param2MoEConfig.from_pretrained(cfg.model)
        else:
            from ..writer import preset_config

            self.model_config = preset_config(cfg.preset)
        mc = self.model_config
        self.dtype = _DTYPES[mc.torch_dtype if cfg.dtype == "auto" else cfg.dtype]
        has_tokenizer = cfg.model is not None and os.path.exists(os.path.join(cfg.model, "tokenizer.json"))
        self.tokenizer = Tokenizer(cfg.model) if has_tokenizer else None
        t0 = time.perf_counter()
        self.model = load_model(cfg.model, self.dtype, cfg.device, shard, config=mc,
                                dummy=cfg.load_format == "dummy", seed=cfg.seed)
        self.model.set_uniform_random_routing(bool(cfg.uniform_random_routing))
        self.max_model_len = cfg.max_model_len or mc.max_position_embeddings
        num_blocks = self._num_kv_blocks()
        if num_blocks * cfg.block_size < self.max_model_len:
            raise EngineError(
                f"the KV cache holds {num_blocks * cfg.block_size} tokens, fewer than max_model_len "
                f"({self.max_model_len}): give it more memory or lower max_model_len")
        decode_token = (lambda i: self.tokenizer.decode([i], skip_special_tokens=False)) if self.tokenizer else None
        self.runner = ModelRunner(self.model, num_blocks, cfg.block_size, cfg.device, self.max_model_len,
                                  decode_token)
        self.block_manager = BlockManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, cfg.max_num_seqs,
                                   max(cfg.max_num_batched_tokens, cfg.max_num_seqs))
        eos = [] if self.model_config.eos_token_id is None else self.model_config.eos_token_ids
        self.eos_token_ids = eos or ([self.tokenizer.eos_token_id] if self.tokenizer and
                                     self.tokenizer.eos_token_id is not None else [])
        self.sampler = Sampler(self.eos_token_ids, decode_token)
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self.load_seconds = time.perf_counter() - t0
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0, "steps": 0}

    def _num_kv_blocks(self) -> int:
        cfg = self.config
        per_block = kv_bytes_per_token(self.model) * cfg.block_size
        budget = cfg.kv_cache_memory
        if budget is None:
            if str(cfg.device).startswith("cuda"):
                free, total = torch.cuda.mem_get_info()
                budget = int(free - total * (1 - cfg.gpu_memory_utilization)) - (1 << 30)  # 1 GiB for activations
            else:  # enough for every sequence at full length, at most 2 GiB
                budget = min(2 << 30, per_block * cfg.max_num_seqs * -(-self.max_model_len // cfg.block_size))
        return max(1, budget // per_block - 1)  # one block is the runner's scratch block

    # ---------------------------------------------------------------------- requests
    def add_request(self, request_id: str, prompt: str | list[int] | dict, params: SamplingParams | None = None,
                    ) -> Request:
        params = params or SamplingParams()
        if request_id in self.requests:
            raise EngineError(f"request_id {request_id!r} is already in use")
        text, ids = self._prompt_ids(prompt)
        if not ids:
            raise EngineError("prompt: empty (no tokens)")
        vocab = self.model_config.vocab_size
        bad = next((t for t in ids if not isinstance(t, int) or not 0 <= t < vocab), None)
        if bad is not None:
            raise EngineError(f"prompt: token id {bad!r} is outside the vocabulary [0, {vocab})")
        # Checked here, not in the sampler: a bad id there would fail the whole batch's step.
        for name, tokens in (("logit_bias", params.logit_bias or ()), ("stop_token_ids", params.stop_token_ids)):
            bad = next((t for t in tokens if not 0 <= t < vocab), None)
            if bad is not None:
                raise EngineError(f"{name}: token id {bad} is outside the vocabulary [0, {vocab})")
        for name in ("logprobs", "prompt_logprobs"):
            if (getattr(params, name) or 0) > vocab:
                raise EngineError(f"{name}={getattr(params, name)}: more than the vocabulary ({vocab} tokens)")
        if len(ids) >= self.max_model_len:
            raise EngineError(f"prompt: {len(ids)} tokens, but the context length (max_model_len) is "
                              f"{self.max_model_len} and at least one token must be generated")
        req = Request(request_id, text, ids, params)
        for i in range(params.n):
            detok = None
            if params.detokenize and self.tokenizer is not None:
                detok = IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens)
            seq = Sequence(next(self._seq_ids), req, i, detok)
            req.seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = req
        return req

    def _prompt_ids(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise EngineError("prompt: text needs a tokenizer, and this model has none (give token ids)")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)):
            return None, list(prompt)
        raise EngineError(f"prompt: expected a string, a list of token ids or a dict, got {type(prompt).__name__}")

    def abort(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        for seq in req.seqs:
            if not seq.is_finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---------------------------------------------------------------------- stepping
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return self._collect_outputs(set())
        out = self.runner.execute(batch)
        self.stats["steps"] += 1
        touched: set[str] = set()
        for b, seq in enumerate(batch.seqs):
            n = batch.num_new_tokens[b]
            if seq.num_computed_tokens < seq.num_prompt_tokens:
                self.stats["prompt_tokens"] += min(n, seq.num_prompt_tokens - seq.num_computed_tokens)
            seq.num_computed_tokens += n
            self.block_manager.commit_full_blocks(seq)
            if b in out.prompt_logprobs:
                seq.prompt_logprobs.extend(out.prompt_logprobs[b])
        if out.sampled_rows:
            result = self.sampler(out.sample_logits, [batch.seqs[b] for b in out.sampled_rows])
            now = time.monotonic()
            for row, b in enumerate(out.sampled_rows):
                seq = batch.seqs[b]
                self._append_token(seq, result.token_ids[row], result.logprobs[row], result.sampled_logprob[row])
                req = seq.request
                req.first_token_time = req.first_token_time or now
                req.last_token_time = now
                touched.add(req.request_id)
        return self._collect_outputs(touched)

    def _append_token(self, seq: Sequence, token: int, logprobs, sampled_logprob: float) -> None:
        p = seq.params
        seq.token_ids.append(token)
        self.stats["generation_tokens"] += 1
        seq.cumulative_logprob += sampled_logprob
        if seq.logprobs is not None:
            seq.logprobs.append(logprobs)
        new_text = seq.detokenizer.add(token) if seq.detokenizer else ""
        n_out = seq.num_output_tokens
        if n_out >= p.min_tokens:
            if not p.ignore_eos and token in self.eos_token_ids:
                return self._finish(seq, "stop", None)
            if token in p.stop_token_ids:
                return self._finish(seq, "stop", token)
        seq.text += new_text
        if p.stop_strings and new_text and n_out >= p.min_tokens:
            hit = find_stop(seq.text, len(new_text), p.stop_strings)
            if hit is not None:
                start, stop = hit
                seq.text = seq.text[: start + (len(stop) if p.include_stop_str_in_output else 0)]
                return self._finish(seq, "stop", stop)
        if (p.max_tokens is not None and n_out >= p.max_tokens) or seq.num_tokens >= self.max_model_len:
            self._finish(seq, "length", None)

    def _finish(self, seq: Sequence, reason: str, stop_reason) -> None:
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        self.scheduler.finish(seq)

    # ---------------------------------------------------------------------- outputs
    def _collect_outputs(self, touched: set[str]) -> list[RequestOutput]:
        outputs = []
        for rid in touched:
            req = self.requests.get(rid)
            if req is None:
                continue
            finished = req.finished
            kind = req.params.output_kind
            if kind == OutputKind.FINAL_ONLY and not finished:
                continue
            outputs.append(self._request_output(req, finished, delta=kind == OutputKind.DELTA))
            if finished:
                del self.requests[rid]
        return outputs

    def _request_output(self, req: Request, finished: bool, delta: bool) -> RequestOutput:
        holdback = max((len(s) for s in req.params.stop_strings), default=1) - 1
        completions = []
        for seq in req.seqs:
            text_end = len(seq.text) if seq.is_finished else max(seq.num_text_sent, len(seq.text) - holdback)
            n_tokens = seq.num_output_tokens
            if delta:
                text = seq.text[seq.num_text_sent:text_end]
                token_ids = seq.output_token_ids[seq.num_tokens_sent:]
                logprobs = seq.logprobs[seq.num_tokens_sent:] if seq.logprobs is not None else None
            else:
                text, token_ids, logprobs = seq.text[:text_end], seq.output_token_ids, seq.logprobs
            seq.num_text_sent, seq.num_tokens_sent = text_end, n_tokens
            completions.append(CompletionOutput(
                index=seq.index, text=text, token_ids=list(token_ids),
                cumulative_logprob=seq.cumulative_logprob if seq.logprobs is not None else None,
                logprobs=list(logprobs) if logprobs is not None else None,
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason))
        first = req.seqs[0]
        prompt_lps = first.prompt_logprobs  # complete once the first token is sampled
        if delta and req.prompt_logprobs_sent:
            prompt_lps = None
        req.prompt_logprobs_sent = True
        metrics = {"arrival_time": req.arrival_time, "first_token_time": req.first_token_time,
                   "last_token_time": req.last_token_time}
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, prompt_lps, completions, finished,
                             first.num_cached_tokens, metrics)
