"""RMSNorm (docs/model.md §3.1), computed in float32, plain torch, and the sum of a MoE layer's expert outputs that the
norm after it may take in (`expert_sum`). The oracles of the Triton versions."""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """w * x / sqrt(mean(x^2) + eps) over the last dim, in fp32, cast back to x's dtype."""
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """residual' = x + residual; return (rms_norm(residual'), residual')."""
    residual = x + residual
    return rms_norm(residual, weight, eps), residual


def expert_sum(pair_out: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """A MoE layer's output from its unsummed form: y[t] = sum_k weights[t, k] * pair_out[t * K + k] in
    fp32, pairs whose id is -1 skipped, rounded to the activation dtype (as the fused MoE rounds it)."""
    t, k = ids.shape
    w = torch.where(ids >= 0, weights.float(), 0.0)
    rows = torch.where((ids >= 0).reshape(-1, 1), pair_out.float(), 0.0)  # skipped rows may hold garbage
    return (rows.view(t, k, -1) * w[..., None]).sum(1).to(pair_out.dtype)


def expert_sum_add_rms_norm(pair_out: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, residual: torch.Tensor,
                            weight: torch.Tensor, eps: float):
    """add_rms_norm(expert_sum(pair_out, weights, ids), residual)."""
    return add_rms_norm(expert_sum(pair_out, weights, ids), residual, weight, eps)
