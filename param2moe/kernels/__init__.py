"""The network's hot operations. Each has a plain torch version (the test oracle, and the CPU path)
and, on CUDA devices, a Triton version; these functions pick one by the tensors' device.
Nothing GPU-only is imported until a CUDA tensor arrives."""

from __future__ import annotations

import importlib

from . import attention as _attention
from . import moe as _moe
from . import norm as _norm
from . import rope as _rope
from . import routing as _routing
from .attention import causal_attention
from .matmul import linear
from .moe import silu_and_mul

_BACKEND = "auto"


def set_backend(name: str) -> None:
    """"auto": Triton kernels for CUDA tensors, plain torch otherwise; "torch": plain torch everywhere
    (the baseline of the benchmarks)."""
    global _BACKEND
    if name not in ("auto", "torch"):
        raise ValueError(f"kernels={name!r}: expected 'auto' or 'torch'")
    _BACKEND = name


def use_triton(x) -> bool:
    return _BACKEND == "auto" and x.is_cuda

# ------------------------------------------------------------------ dispatch to the Triton kernels
_TRITON: dict = {}


def _tri(name: str):
    """The Triton module `kernels/triton/<name>.py`, imported on first use (None when triton is missing)."""
    mod = _TRITON.get(name, False)
    if mod is False:
        try:
            mod = importlib.import_module(f"{__name__}.triton.{name}")
        except ImportError:
            mod = None
        _TRITON[name] = mod
    return mod


def triton_available(name: str) -> bool:
    return _tri(name) is not None


def _pick(x, name: str):
    return _tri(name) if use_triton(x) else None


def rms_norm(x, weight, eps: float):
    t = _pick(x, "norm")
    return t.rms_norm(x, weight, eps) if t else _norm.rms_norm(x, weight, eps)


def add_rms_norm(x, residual, weight, eps: float):
    t = _pick(x, "norm")
    return t.add_rms_norm(x, residual, weight, eps) if t else _norm.add_rms_norm(x, residual, weight, eps)


def apply_rope(x, cos, sin):
    t = _pick(x, "norm")
    return t.apply_rope(x, cos, sin) if t else _rope.apply_rope(x, cos, sin)


def qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps: float, kv_write=None):
    """Per-head RMSNorm of q and k (none when the weights are None), then RoPE, and with kv_write =
    (v, k_cache, v_cache, slot_mapping) the KV-cache write: one launch on CUDA."""
    t = _pick(q, "norm")
    fn = t.qk_norm_rope if t else _rope.qk_norm_rope
    return fn(q, k, q_weight, k_weight, cos, sin, eps, kv_write)


def route(logits, expert_bias, top_k: int, **kw):
    t = _pick(logits, "routing")
    return t.route(logits, expert_bias, top_k, **kw) if t else _routing.route(logits, expert_bias, top_k, **kw)


def gate_route(x, gate_weight, expert_bias, top_k: int, **kw):
    """Router logits (fp32) and routing; one launch for decode-sized CUDA batches."""
    t = _pick(x, "routing")
    fn = t.gate_route if t else _routing.gate_route
    return fn(x, gate_weight, expert_bias, top_k, **kw)


def moe_experts(x, w13, w2, weights, ids):
    t = _pick(x, "moe")
    if t:
        return t.moe_experts(x, w13, w2, weights, ids)
    fn = _moe.moe_experts_cpu if x.device.type == "cpu" else _moe.moe_experts
    return fn(x, w13, w2, weights, ids)


def paged_attention(q, k_cache, v_cache, block_tables, context_lens, query_start_loc, scale: float,
                    max_query_len: int, max_context_len: int):
    t = _pick(q, "attention")
    fn = t.paged_attention if t else _attention.paged_attention
    return fn(q, k_cache, v_cache, block_tables, context_lens, query_start_loc, scale, max_query_len,
              max_context_len)


__all__ = ["add_rms_norm", "apply_rope", "causal_attention", "gate_route", "linear", "moe_experts", "paged_attention",
           "qk_norm_rope", "rms_norm", "route", "set_backend", "silu_and_mul", "use_triton"]
