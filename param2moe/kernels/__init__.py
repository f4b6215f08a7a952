"""The network's hot operations. Each has a plain torch version (the test oracle, and the CPU path)
and, on CUDA devices, a Triton version; these functions pick one by the tensors' device.
Nothing GPU-only is imported until a CUDA tensor arrives."""

from __future__ import annotations

from .attention import causal_attention, paged_attention, write_kv_cache
from .moe import moe_experts, silu_and_mul
from .norm import add_rms_norm, rms_norm
from .rope import apply_rope
from .routing import route

__all__ = ["add_rms_norm", "apply_rope", "causal_attention", "moe_experts", "paged_attention", "rms_norm",
           "route", "silu_and_mul", "write_kv_cache"]
