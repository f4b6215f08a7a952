"""LLMEngine: requests in, one scheduled batch per step(), outputs out.

Owns the tokenizer, the model runner, the block manager and the scheduler. Synchronous; the
asyncio front end (async_engine.py) drives it from a worker thread for the server.
"""

from __future__ import annotations

import functools
import itertools
import os
import time
import weakref

import torch

from ..config import Param2MoEConfig
from ..kernels import Kernels
from ..structured.manager import StructuredOutputs
from ..tokenizer import Tokenizer
from .block_manager import BlockManager
from .config import EngineConfig, generation_eos_ids, read_generation_config, resolve_dtype
from .detokenizer import IncrementalDetokenizer, find_stop
from .outputs import CompletionOutput, RequestOutput, logprob_entries
from .sampler import Sampler
from .sampling_params import OutputKind, SamplingParams
from .scheduler import ScheduledBatch, Scheduler
from .sequence import Request, Sequence
from .worker import build_runner


def _eos_token_ids(mc: Param2MoEConfig, generation_config: dict, tokenizer) -> list[int]:
    """End-of-sequence ids: config.json's, and generation_config.json's (which, as vLLM reads it, may
    add the end-of-turn token); the tokenizer's when neither has one."""
    ids = list(mc.eos_token_ids)
    ids += [i for i in generation_eos_ids(generation_config) if i not in ids]
    if not ids and tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def _decode_one(tokenizer, token: int) -> str:
    return tokenizer.decode([token], skip_special_tokens=False)


class EngineError(ValueError):
    """A request the engine cannot take; the message says which field and why."""


class LLMEngine:
    def __init__(self, config: EngineConfig):
        cfg = self.config = config.resolve()
        torch.manual_seed(cfg.seed)
        self.kernels = Kernels(cfg.kernels)  # the backend of the model's hot ops, the sampler's and the graphs'
        if str(cfg.device).startswith("cpu"):
            from .cpu_setup import configure_cpu_allocator

            configure_cpu_allocator()
        self.model_config = mc = cfg.model_config()
        self.dtype = resolve_dtype(cfg, mc)
        has_tokenizer = cfg.model is not None and os.path.exists(os.path.join(cfg.model, "tokenizer.json"))
        self.tokenizer = Tokenizer(cfg.model) if has_tokenizer else None
        parallel = cfg.parallel
        parallel.validate(mc)
        self.ranks = self.comm = None
        self._closed = False
        if parallel.world_size > 1:
            from .ranks import DriverRanks

            self.ranks = DriverRanks(cfg, parallel)
            # stops the other ranks when the engine is collected, or at exit; holds no reference to the engine
            self._finalizer = weakref.finalize(self, self.ranks.stop)
            self.comm = self.ranks.comm
        try:
            self._build(cfg, mc, parallel)
        except BaseException:
            self.shutdown()
            raise

    def _build(self, cfg: EngineConfig, mc: Param2MoEConfig, parallel) -> None:
        ranks = self.ranks
        shard, device = (ranks.shard, ranks.device) if ranks else (None, None)
        self.generation_config = read_generation_config(cfg.model)
        self.eos_token_ids = _eos_token_ids(mc, self.generation_config, self.tokenizer)
        decode_token = functools.partial(_decode_one, self.tokenizer) if self.tokenizer else None
        self.sampler = Sampler(self.eos_token_ids, decode_token, self.kernels)
        self.model, self.runner, num_blocks = build_runner(cfg, mc, self.dtype, self.sampler, shard, self.comm,
                                                           device)
        if ranks:
            ranks.runner = self.runner
        self.max_model_len = cfg.max_model_len or mc.max_position_embeddings
        if num_blocks * cfg.block_size < self.max_model_len:
            raise EngineError(
                f"the KV cache holds {num_blocks * cfg.block_size} tokens, fewer than max_model_len "
                f"({self.max_model_len}): give it more memory or lower max_model_len")
        self.block_manager = BlockManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.lora = None
        if cfg.enable_lora:
            from ..lora.manager import LoRAManager

            self.lora = LoRAManager(self.model.lora, mc, self.runner.device)
        self.scheduler = Scheduler(self.block_manager, cfg.max_num_seqs, cfg.token_budget, self.lora)
        self.structured = StructuredOutputs(self.tokenizer, mc.vocab_size, self.eos_token_ids,
                                            cfg.grammar_compile_timeout)
        # Overlap host work with the GPU (see step): on CUDA, with one pipeline stage (tensor-parallel
        # ranks get the sampled ids from the driver; a first stage would need them from the last).
        on = cfg.async_scheduling
        self.overlap = parallel.pipeline_parallel_size == 1 and (
            str(cfg.device).startswith("cuda") if on is None else on)
        self._pending = None  # PendingSample of the step whose tokens are not read yet
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0, "steps": 0}

    def shutdown(self) -> None:
        """Stop the other ranks (if any) and let go of the model, its KV cache and CUDA graphs. Idempotent;
        the engine takes no requests after it. Also runs when a parallel engine is garbage-collected."""
        self._closed = True
        if self.ranks is not None:
            self._finalizer()  # ranks.stop, once
            self.comm = None
        runner = getattr(self, "runner", None)
        if runner is not None:
            runner.release_cuda_graphs()
        self.runner = self.model = None

    # ---------------------------------------------------------------------- adapters
    def add_lora(self, lora_request) -> bool:
        """Register (read and check) an adapter ahead of its requests; a lora.LoRAError names what is wrong."""
        if self.lora is None:
            raise EngineError("lora_request: this engine was started without enable_lora")
        self.lora.add(lora_request)
        return True

    def remove_lora(self, lora_id: int) -> bool:
        """Forget an adapter; refused (LoRAError) while requests of it are unfinished."""
        if self.lora is None:
            return False
        users = [r.request_id for r in self.requests.values() if r.lora is not None and r.lora.lora_id == lora_id]
        if users:
            from ..lora import LoRAError

            raise LoRAError(f"adapter id {lora_id} is in use by {len(users)} unfinished request(s)")
        return self.lora.remove(lora_id)

    def list_loras(self) -> list:
        """The registered adapters (lora.LoRAAdapter), in order of registration."""
        return [] if self.lora is None else list(self.lora.adapters.values())

    # ---------------------------------------------------------------------- expert load balancing
    @property
    def eplb(self):
        """The driver's eplb.ExpertBalancer (None without enable_eplb)."""
        return self.runner.eplb if self.runner is not None else None

    def expert_load(self):
        """eplb.ExpertLoad: tokens per logical expert per MoE layer over the window, the placement, each layer's
        imbalance (needs enable_eplb). Reads the device (a sync): call it between steps."""
        if self.eplb is None:
            raise EngineError("expert load statistics need enable_eplb=True")
        return self.eplb.expert_load()

    # ---------------------------------------------------------------------- requests
    def add_request(self, request_id: str, prompt: str | list[int] | dict, params: SamplingParams | None = None,
                    lora_request=None) -> Request:
        """Queue a request; lora_request (a LoRARequest) runs it with that adapter, registered on first use."""
        params = params or SamplingParams()
        if self._closed:
            raise EngineError("the engine is shut down")
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
        adapter = None
        if lora_request is not None:
            if self.lora is None:
                raise EngineError("lora_request: this engine was started without enable_lora")
            adapter = self.lora.add(lora_request)
        grammar = self.structured.compile(params.structured_outputs) if params.structured_outputs else None
        req = Request(request_id, text, ids, params, adapter)
        for i in range(params.n):
            detok = None
            if params.detokenize and self.tokenizer is not None:
                detok = IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens)
            seq = Sequence(next(self._seq_ids), req, i, detok)
            if grammar is not None:
                self.structured.start(seq, grammar)
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
        """Schedule and launch one step. With overlap (CUDA, one pipeline stage) the tokens of the step
        before are read only after this one is queued: the host's bookkeeping (detokenizing, stop
        checks, outputs, the next plan) runs while the GPU computes. Those sequences count a pending
        token meanwhile; their next inputs are taken from the sampled ids on the device, and a sequence
        that turns out finished has its extra row dropped."""
        if self._closed:
            raise EngineError("the engine is shut down")
        batch = self.scheduler.schedule()
        touched: set[str] = set()
        if self._pending is not None and (not batch.seqs or any(s.params.has_penalties for s in batch.seqs)):
            touched |= self._resolve()  # penalties read the tokens themselves
            keep = [i for i, seq in enumerate(batch.seqs) if not seq.is_finished]
            batch = ScheduledBatch([batch.seqs[i] for i in keep], [batch.num_new_tokens[i] for i in keep])
        if not batch.seqs:
            return self._collect_outputs(touched)
        prev = self._pending
        try:
            out = self.runner.execute(batch, *((prev.sampled, prev.rows()) if prev else ()))
        except RuntimeError as e:
            if self.ranks is not None:
                self.ranks.raise_if_a_worker_died(e)
            raise
        sampled = [batch.seqs[b] for b in out.sampled_rows]
        pending = None
        if sampled:
            if prev is not None and any(seq.grammar is not None for seq in sampled):
                touched |= self._resolve()  # a grammar's mask needs the tokens so far (the GPU runs the step)
            bitmask = self.structured.bitmask(sampled, out.sample_logits.device)
            pending = self.sampler.sample(out.sample_logits, sampled, out.greedy_ids, bitmask)
        if self._pending is not None:
            touched |= self._resolve()
        self.stats["steps"] += 1
        for b, seq in enumerate(batch.seqs):
            if seq.is_finished:  # finished by the previous step's tokens: this step's row is dropped
                continue
            n = batch.num_new_tokens[b]
            if seq.num_computed_tokens < seq.num_prompt_tokens:
                self.stats["prompt_tokens"] += min(n, seq.num_prompt_tokens - seq.num_computed_tokens)
            seq.num_computed_tokens += n
            self.block_manager.commit_full_blocks(seq)
            if b in out.prompt_logits:
                seq.prompt_logprobs.extend(self._prompt_logprobs(seq, *out.prompt_logits[b]))
        outputs = self._collect_outputs(touched) if self.overlap else None  # before new tokens are pending
        if pending is not None and any(not seq.is_finished for seq in sampled):
            for seq in sampled:
                if not seq.is_finished:
                    seq.num_pending_tokens += 1
            self._pending = pending
        if self.overlap:
            return outputs
        if self._pending is not None:
            touched |= self._resolve()
        return self._collect_outputs(touched)

    def _resolve(self) -> set[str]:
        """Read the pending step's tokens and append them (detokenize, stop checks, finish)."""
        pending, self._pending = self._pending, None
        result = pending.resolve()
        now = time.monotonic()
        touched = set()
        for row, seq in enumerate(pending.seqs):
            if seq.is_finished or not seq.num_pending_tokens:
                continue  # finished (or aborted) before its token was read
            seq.num_pending_tokens -= 1
            self._append_token(seq, result.token_ids[row], result.logprobs[row], result.sampled_logprob[row])
            req = seq.request
            req.first_token_time = req.first_token_time or now
            req.last_token_time = now
            touched.add(req.request_id)
        return touched

    def _prompt_logprobs(self, seq: Sequence, first: int, logits: torch.Tensor):
        """Entries for the prompt tokens first+1.. (each with the top-N beside it)."""
        targets = torch.tensor(seq.token_ids[first + 1:first + 1 + logits.shape[0]], device=logits.device)
        n = seq.params.prompt_logprobs
        return logprob_entries(logits.log_softmax(-1), targets, [n] * len(targets), self.sampler.decode_token)[0]

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
        if seq.grammar is not None and (end := self.structured.advance(seq, token)):
            return self._finish(seq, end, None)  # the grammar ended (on a stop token) or refused the token
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
