"""Batched sampling on the model's device: one set of tensor operations for the whole batch.

Order, as in vLLM: the grammar's token mask of a constrained output (structured/), logit bias,
min_tokens masking, penalties (repetition over prompt and output, presence and frequency over the
output), then greedy argmax, or temperature, top-k, top-p, min-p and a draw. The draw is an
exponential race (argmax of p / E with E ~ Exp(1)), which is a sample from p; a seeded request draws
its E from its own generator, so its tokens do not depend on what else is in the batch. Logprobs are
those of the model's raw distribution (log_softmax of the logits, before any of the above).
"""

from __future__ import annotations

import torch

from ..kernels import AUTO, Kernels
from ..structured.bitmask import apply_token_bitmask
from .model_runner import to_device
from .outputs import Logprob, entries_from_stats, logprob_stats
from .sequence import Sequence


class SampleResult:
    def __init__(self, token_ids: list[int], logprobs: list[dict[int, Logprob] | None], sampled_logprob: list[float]):
        self.token_ids, self.logprobs, self.sampled_logprob = token_ids, logprobs, sampled_logprob


class PendingSample:
    """Tokens drawn on the device for `seqs` and not yet read by the host. On CUDA the ids (and the
    logprob figures, when asked for) are copied to pinned memory behind the step's kernels, so
    `resolve` waits for this step only, never for work queued after it (the engine launches the next
    step first: host and GPU overlap)."""

    def __init__(self, seqs: list[Sequence], sampled: torch.Tensor, raw_logprobs: torch.Tensor | None,
                 decode_token):
        self.seqs = seqs
        self.sampled = sampled  # [S] token ids on the device: the next step's inputs read them there
        self.top_n = [s.params.logprobs for s in seqs]
        self.decode_token = decode_token
        results = [sampled]
        if raw_logprobs is not None:
            results += logprob_stats(raw_logprobs, sampled, self.top_n)
        # A snapshot: `sampled` may be a view of a buffer the next step overwrites (the decode graphs' greedy ids).
        self.event = None
        if sampled.is_cuda:
            results = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                       for t in results]
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            results = [t.clone() for t in results]
        self.results = results

    def rows(self) -> dict[int, int]:
        """seq_id -> row of `sampled`."""
        return {seq.seq_id: row for row, seq in enumerate(self.seqs)}

    def resolve(self) -> SampleResult:
        if self.event is not None:
            self.event.synchronize()
        token_ids, *stats = (t.tolist() for t in self.results)
        n = len(token_ids)
        if not stats:
            return SampleResult(token_ids, [None] * n, [0.0] * n)
        logprobs, sampled_lp = entries_from_stats(stats, self.top_n, self.decode_token)
        return SampleResult(token_ids, logprobs, sampled_lp)


def _on(device, values: list, dtype=None) -> torch.Tensor:
    """A small host list on the device, without waiting for the GPU (see to_device)."""
    return to_device(torch.tensor(values, dtype=dtype), device)


def _padded(rows: list[list[int]], device) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    out = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return to_device(out, device)


def _changes_logits(seq: Sequence) -> bool:
    """Whether a logit bias, min_tokens or a penalty applies to this sequence's next token."""
    p = seq.params
    return bool(p.logit_bias) or _holds_back_eos(seq) or p.has_penalties


def _holds_back_eos(seq: Sequence) -> bool:
    """min_tokens bans the end; a grammar decides where its output ends itself (banning the end where
    only the end is allowed would leave no token)."""
    return seq.num_output_tokens < seq.params.min_tokens and seq.grammar is None


class Sampler:
    def __init__(self, eos_token_ids: list[int], decode_token=None, kernels: Kernels = AUTO):
        self.eos_token_ids = eos_token_ids
        self.decode_token = decode_token  # id -> text, for Logprob.decoded_token
        self.kernels = kernels

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
        return self.sample(logits, seqs).resolve()

    def greedy(self, logits: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Each row's most likely token (ties: the lowest id) [B] int64, into out when given: the choice of
        greedy rows. The decode graphs capture it on their logits; sample() takes their result as greedy_ids."""
        return self.kernels.argmax(logits, out)

    @torch.inference_mode()  # the step's logits are inference tensors (ModelRunner.execute): written in place here
    def sample(self, logits: torch.Tensor, seqs: list[Sequence], greedy_ids: torch.Tensor | None = None,
               bitmask: torch.Tensor | None = None) -> PendingSample:
        """Queue the draw of one token per row; nothing here waits for the device (penalties and grammars
        read the sequences' tokens, so the engine resolves earlier steps before sampling a batch that has
        them). greedy_ids: greedy(logits), when already computed (by the decode graph); bitmask: the
        grammars' packed token masks, one row per sequence (structured/manager.py)."""
        dev, v = logits.device, logits.shape[1]
        want_logprobs = any(s.params.logprobs is not None for s in seqs)
        raw_logprobs = logits.log_softmax(-1) if want_logprobs else None
        if bitmask is not None:  # in place: these logits are the step's own (the graph's output is rewritten next)
            apply_token_bitmask(logits, bitmask)
            greedy_ids = None
        if any(_changes_logits(s) for s in seqs):
            logits = self._apply_bias_and_penalties(logits.clone(), seqs)
            greedy_ids = None

        params = [s.params for s in seqs]
        sampled = self.greedy(logits) if greedy_ids is None else greedy_ids
        if not all(p.greedy for p in params):  # decided on the host: no device read
            greedy = _on(dev, [p.greedy for p in params])
            temp = _on(dev, [max(p.temperature, 1e-5) for p in params], torch.float32)
            x = logits / temp[:, None]
            if any(p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0 for p in params):
                x = self._top_k_top_p_min_p(x, params)
            probs = x.softmax(-1)
            race = torch.empty_like(probs)
            unseeded = [i for i, s in enumerate(seqs) if s.seed is None]
            if unseeded:
                race[_on(dev, unseeded, torch.long)] = torch.empty(len(unseeded), v, device=dev).exponential_()
            for i, s in enumerate(seqs):
                if s.seed is not None:
                    if s.generator is None:
                        s.generator = torch.Generator(device=dev).manual_seed(s.seed)
                    race[i] = torch.empty(v, device=dev).exponential_(generator=s.generator)
            drawn = (probs / race).argmax(-1)
            sampled = torch.where(greedy, sampled, drawn)
        return PendingSample(seqs, sampled, raw_logprobs, self.decode_token)

    def _apply_bias_and_penalties(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        dev, v = logits.device, logits.shape[1]
        for i, s in enumerate(seqs):
            p = s.params
            if p.logit_bias:
                ids = _on(dev, [t for t in p.logit_bias if 0 <= t < v], torch.long)
                vals = _on(dev, [b for t, b in p.logit_bias.items() if 0 <= t < v])
                logits[i].index_add_(0, ids, vals.to(logits.dtype))
            if _holds_back_eos(s):
                banned = ([] if p.ignore_eos else self.eos_token_ids) + p.stop_token_ids
                if banned:
                    logits[i, _on(dev, banned, torch.long)] = float("-inf")
        rep = [i for i, s in enumerate(seqs) if s.params.repetition_penalty != 1.0]
        if rep:
            tokens = _padded([seqs[i].token_ids for i in rep], dev)
            seen = torch.zeros(len(rep), v + 1, dtype=torch.bool, device=dev)
            seen.scatter_(1, tokens.masked_fill(tokens < 0, v), True)
            seen = seen[:, :v]
            pen = _on(dev, [seqs[i].params.repetition_penalty for i in rep])[:, None]
            idx = _on(dev, rep, torch.long)
            rows = logits[idx]
            logits[idx] = torch.where(seen, torch.where(rows > 0, rows / pen, rows * pen), rows)
        pf = [i for i, s in enumerate(seqs) if s.params.presence_penalty or s.params.frequency_penalty]
        if pf:
            tokens = _padded([seqs[i].output_token_ids for i in pf], dev)
            counts = torch.zeros(len(pf), v + 1, device=dev)
            counts.scatter_add_(1, tokens.masked_fill(tokens < 0, v), torch.ones_like(tokens, dtype=counts.dtype))
            counts = counts[:, :v]
            presence = _on(dev, [seqs[i].params.presence_penalty for i in pf])[:, None]
            frequency = _on(dev, [seqs[i].params.frequency_penalty for i in pf])[:, None]
            logits[_on(dev, pf, torch.long)] -= frequency * counts + presence * (counts > 0)
        return logits

    @staticmethod
    def _top_k_top_p_min_p(x: torch.Tensor, params) -> torch.Tensor:
        dev, v = x.device, x.shape[1]
        top_k = _on(dev, [p.top_k if p.top_k > 0 else v for p in params])
        top_p = _on(dev, [p.top_p for p in params])
        min_p = _on(dev, [p.min_p for p in params])
        vals, idx = x.sort(-1, descending=True)
        rank = torch.arange(v, device=dev)[None, :]
        drop = rank >= top_k[:, None]
        probs = vals.masked_fill(drop, float("-inf")).softmax(-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop |= (probs.cumsum(-1) - probs) > top_p[:, None]
        drop |= probs < min_p[:, None] * probs[:, :1]
        vals = vals.masked_fill(drop, float("-inf"))
        return torch.empty_like(x).scatter_(1, idx, vals)
