"""Routed experts (docs/model.md §3.4), plain torch: every expert is a SwiGLU; the oracle of the fused MoE kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .matmul import linear


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def moe_experts(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
    row_bucket=None, per_expert_from: int | None = None,
) -> torch.Tensor:
    """sum_k weights[t, k] * Expert_{ids[t, k]}(x[t]).

    x: [T, H]; w13: [E, 2I, H] (gate rows, then up rows); w2: [E, H, I];
    weights: [T, K] float32; ids: [T, K] (expert index, or -1 for "no expert": contributes nothing).
    The (token, k) pairs are sorted by expert so that each expert runs one matmul over its tokens
    (elementwise work runs once over all the pairs); each result, times its weight, is added to its
    token's row in float32. row_bucket(n), when given, pads each expert's n rows to that many (see
    moe_experts_cpu); padding rows repeat the expert's last row and their results are dropped.
    per_expert_from: from this many (token, expert) pairs on, each expert's rows run through both
    matmuls, the activation and the weighted sum on their own (`_moe_per_expert`).
    """
    t, k = ids.shape
    flat = ids.reshape(-1)
    order = flat.argsort(stable=True)  # -1 entries first, then expert 0, 1, ...
    counts = torch.bincount(flat[flat >= 0], minlength=w13.shape[0]).tolist()
    n_valid = sum(counts)
    if n_valid == 0:
        return torch.zeros(t, w2.shape[1], dtype=x.dtype, device=x.device)
    order = order[t * k - n_valid:]  # the pairs that have an expert, by expert
    token = order // k
    experts = [e for e, n in enumerate(counts) if n]
    sizes = [counts[e] for e in experts]
    padded = [row_bucket(n) for n in sizes] if row_bucket else sizes
    rows = token
    kept = None
    if padded != sizes:
        # Row r of the padded layout reads pair src[r]; rows kept[i] of it are the real pairs, in order.
        src, kept, start, pstart = [], [], 0, 0
        for n, p in zip(sizes, padded):
            src.append(torch.arange(start, start + p, device=x.device).clamp_(max=start + n - 1))
            kept.append(torch.arange(pstart, pstart + n, device=x.device))
            start, pstart = start + n, pstart + p
        rows, kept = token.index_select(0, torch.cat(src)), torch.cat(kept)
    if per_expert_from is not None and n_valid >= per_expert_from:
        return _moe_per_expert(x, w13, w2, weights.reshape(-1)[order], token, rows, kept, experts, padded)
    xs = x.index_select(0, rows).split(padded)
    gate_up = torch.cat([linear(xe, w13, index=e) for e, xe in zip(experts, xs)])
    act = silu_and_mul(gate_up).split(padded)
    out = torch.cat([linear(ae, w2, index=e) for e, ae in zip(experts, act)])
    out = (out if kept is None else out.index_select(0, kept)).float()
    y = torch.zeros(t, w2.shape[1], dtype=torch.float32, device=x.device)
    y.index_add_(0, token, out.mul_(weights.reshape(-1)[order, None]))  # out: a fresh tensor, scaled in place
    return y.to(x.dtype)


def _moe_per_expert(x, w13, w2, pair_weights, token, rows, kept, experts, padded) -> torch.Tensor:
    """moe_experts' sum, one expert at a time: the same products and the same float32 additions in
    the same order (a token's contributions by ascending expert), without the batch-wide copies of
    the batched form (gathered inputs, concatenated matmul outputs, the kept rows: on the CPU each a
    pass over tens of MB at prefill sizes, 10-15% of a prefill step); an expert's intermediate
    results stay in the core's cache. Padding rows carry weight 0 onto their real row's token."""
    w = pair_weights if kept is None else pair_weights.new_zeros(sum(padded)).index_copy_(0, kept, pair_weights)
    tok = token if kept is None else rows
    y = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32, device=x.device)
    start = 0
    for e, p in zip(experts, padded):
        r, we = tok[start:start + p], w[start:start + p]
        act = silu_and_mul(linear(x.index_select(0, r), w13, index=e))
        y.index_add_(0, r, linear(act, w2, index=e).float().mul_(we[:, None]))
        start += p
    return y.to(x.dtype)


def _bucket(n: int) -> int:
    """n rounded up to a row count of a small fixed set: up to 64 rows as they are (decode steps: the few
    counts seen after a warm-up; padding small calls costs more than it saves), then multiples of 32 up
    to 256 and of 64 beyond (prefill: a new count in almost every call otherwise)."""
    step = 1 if n <= 64 else 32 if n <= 256 else 64
    return -(-n // step) * step


# Pairs from which moe_experts_cpu runs expert by expert: prefill sizes. (Decode batches keep the batched
# elementwise work: a few launches per layer instead of a few per expert.)
_PER_EXPERT_FROM = 1024


def moe_experts_cpu(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """moe_experts as `kernels.moe_experts` runs it on CPU tensors: each expert's rows padded to a
    bucketed count. oneDNN builds (JIT-compiles) a matmul primitive for every new shape, 0.2-0.5 ms
    each, and the number of tokens routed to an expert changes every step: without padding most
    prefill steps pay that for nearly every expert call (7-14% of a prefill step on two Zen 5 cores).
    Padded to a few row counts, the shapes repeat after a warm-up."""
    return moe_experts(x, w13, w2, weights, ids, row_bucket=_bucket, per_expert_from=_PER_EXPERT_FROM)
