"""Rotary embedding applied to q and k (docs/model.md §3.2), plain torch. The oracle of the Triton version."""

from __future__ import annotations

import torch


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX rotate-half over the first 2*cos.shape[-1] dims of each head; the rest pass through.

    x: [T, heads, D]; cos, sin: [T, r/2] float32 (already gathered at the tokens' positions).
    """
    half = cos.shape[-1]
    r = 2 * half
    x32 = x[..., :r].float()
    x1, x2 = x32[..., :half], x32[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    rotated = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)
    if r == x.shape[-1]:
        return rotated
    return torch.cat((rotated, x[..., r:]), dim=-1)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None,
                 cos: torch.Tensor, sin: torch.Tensor, eps: float, kv_write=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm of q [T, NH, D] and k [T, NKV, D] (none when the weights are None), then RoPE on
    both: the composition the attention block runs, and the oracle of the fused Triton kernel.
    kv_write = (v, k_cache, v_cache, slot_mapping): also store the new k and v in the paged cache
    (`attention.write_kv_cache`), which the Triton kernel does in the same launch."""
    from .attention import write_kv_cache
    from .norm import rms_norm

    if q_weight is not None:
        q, k = rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if kv_write is not None:
        write_kv_cache(k, *kv_write)
    return q, k
