"""Rotary position embedding: inverse frequencies for each scaling type, and the cos/sin table.

NeoX (rotate-half) form over the first `rotary_dim` dims of each head (docs/model.md §3.2). The scaling types
follow their usual definitions (the ones Hugging Face's rope utilities implement), with one choice
of ours: `dynamic` NTK scaling uses one fixed base computed for max_position_embeddings * factor
(as vLLM does). Hugging Face recomputes the base as the sequence grows, which would give cached keys
rotations that no longer match; a paged engine needs one rotation per position.
"""

from __future__ import annotations

import math

import torch

from ..config import Param2MoEConfig


def _default_inv_freq(dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(config: Param2MoEConfig) -> tuple[torch.Tensor, float]:
    """Return (inv_freq [rotary_dim/2] float64, attention_factor applied to cos and sin)."""
    dim, base = config.rotary_dim, float(config.rope_theta)
    p = config.rope_params
    kind = p["rope_type"]
    inv_freq = _default_inv_freq(dim, base)
    if kind == "default":
        return inv_freq, 1.0
    factor = float(p["factor"])
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "dynamic":
        max_pos = config.max_position_embeddings
        seq_len = max_pos * factor
        base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        return _default_inv_freq(dim, base), 1.0
    if kind == "llama3":
        low, high = float(p["low_freq_factor"]), float(p["high_freq_factor"])
        old_ctx = float(p["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        out = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(is_medium, smoothed, out), 1.0
    if kind == "yarn":
        old_ctx = float(p.get("original_max_position_embeddings") or config.max_position_embeddings)
        beta_fast, beta_slow = float(p.get("beta_fast", 32)), float(p.get("beta_slow", 1))
        if p.get("attention_factor") is not None:
            attention_factor = float(p["attention_factor"])
        elif p.get("mscale") and p.get("mscale_all_dim"):
            attention_factor = _yarn_mscale(factor, p["mscale"]) / _yarn_mscale(factor, p["mscale_all_dim"])
        else:
            attention_factor = _yarn_mscale(factor)

        def correction_dim(rotations: float) -> float:
            return dim * math.log(old_ctx / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if p.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # avoid a zero-width ramp
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        extrapolation_weight = 1 - ramp
        inv_freq = (inv_freq / factor) * (1 - extrapolation_weight) + inv_freq * extrapolation_weight
        return inv_freq, attention_factor
    raise ValueError(f"unknown rope type {kind!r}")  # config.validate() rejects it first


def rope_cos_sin(config: Param2MoEConfig, max_positions: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [max_positions, rotary_dim/2], float32."""
    inv_freq, attention_factor = rope_inv_freq(config)
    t = torch.arange(max_positions, dtype=torch.float64)
    freqs = torch.outer(t, inv_freq)
    cos = (freqs.cos() * attention_factor).float()
    sin = (freqs.sin() * attention_factor).float()
    return cos.to(device), sin.to(device)
