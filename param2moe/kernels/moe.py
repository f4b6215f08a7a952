"""Routed experts (SPEC 3.4), plain torch: every expert is a SwiGLU; the oracle of the fused MoE kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def moe_experts(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """sum_k weights[t, k] * Expert_{ids[t, k]}(x[t]).

    x: [T, H]; w13: [E, 2I, H] (gate rows, then up rows); w2: [E, H, I];
    weights: [T, K] float32; ids: [T, K] (expert index, or -1 for "no expert": contributes nothing).
    Tokens are grouped by expert so that each expert runs one matmul over its tokens.
    """
    t, k = ids.shape
    out = torch.zeros(t, x.shape[1], dtype=torch.float32, device=x.device)
    flat_ids = ids.reshape(-1)
    order = flat_ids.argsort(stable=True)
    counts = torch.bincount(flat_ids[flat_ids >= 0], minlength=w13.shape[0]).tolist()
    token_of = order // k
    start = int((flat_ids < 0).sum())  # the -1 entries sort first
    for expert, n in enumerate(counts):
        if n == 0:
            continue
        rows = order[start:start + n]
        tokens = token_of[start:start + n]
        start += n
        h = silu_and_mul(x[tokens] @ w13[expert].t()) @ w2[expert].t()
        out.index_add_(0, tokens, h.float() * weights.reshape(-1)[rows, None])
    return out.to(x.dtype)
