"""Routed experts (SPEC 3.4), plain torch: every expert is a SwiGLU; the oracle of the fused MoE kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .matmul import linear


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def moe_experts(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """sum_k weights[t, k] * Expert_{ids[t, k]}(x[t]).

    x: [T, H]; w13: [E, 2I, H] (gate rows, then up rows); w2: [E, H, I];
    weights: [T, K] float32; ids: [T, K] (expert index, or -1 for "no expert": contributes nothing).
    The (token, k) pairs are sorted by expert so that each expert runs one matmul over its tokens
    (elementwise work runs once over all the pairs); each result, times its weight, is added to its
    token's row in float32.
    """
    t, k = ids.shape
    flat = ids.reshape(-1)
    order = flat.argsort(stable=True)  # -1 entries first, then expert 0, 1, ...
    counts = torch.bincount(flat[flat >= 0], minlength=w13.shape[0]).tolist()
    order = order[t * k - sum(counts):]  # the pairs that have an expert, by expert
    token = order // k
    experts = [e for e, n in enumerate(counts) if n]
    sizes = [counts[e] for e in experts]
    xs = x.index_select(0, token).split(sizes)
    gate_up = torch.cat([linear(xe, w13, index=e) for e, xe in zip(experts, xs)])
    act = silu_and_mul(gate_up).split(sizes)
    out = torch.cat([linear(ae, w2, index=e) for e, ae in zip(experts, act)]).float()
    y = torch.zeros(t, w2.shape[1], dtype=torch.float32, device=x.device)
    y.index_add_(0, token, out.mul_(weights.reshape(-1)[order, None]))  # out: a fresh tensor, scaled in place
    return y.to(x.dtype)
