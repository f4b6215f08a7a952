"""One decoder layer of a CPU decode step in one native call (decode_layer.c): norm, QKV, attention with QK-norm /
RoPE / the cache write, output projection, norm, then the dense MLP or router + experts + shared experts.

The model hands its layer over as `LayerWeights` (model/network.py DecoderLayer.native_weights); `decode_layer`
returns (mlp_out, residual) as DecoderLayer.forward does, or None where the fused step does not take the layer
or the step (then the per-op path runs): more than one rank, a bias, 16/32-bit weight matrices with more than
_DENSE_ROWS rows (oneDNN's matmuls win there), dtypes or shapes the kernels lack. `P2M_CPU_NATIVE_LAYER=0` turns
it off alone.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

import torch

from ...mapped import RowPieces
from . import _DTYPES, _MOE_SRC, _OPS_SRC, _QUANT_SRC, _SRC, _load, _quant_ok, enabled, expert_pointers, moe_enabled
from . import _state as _native_state

_LAYER_SRC = _SRC.with_name("decode_layer.c")
_DENSE_ROWS = 2  # as Kernels' _NATIVE_LINEAR_UP_TO
# P2M_CPU_NATIVE_LAYER=0 turns the fused step off alone (the per-op path, its kernels native still).
_ON = {"layer": None}


def layer_enabled() -> bool:
    if _ON["layer"] is None:
        _ON["layer"] = os.environ.get("P2M_CPU_NATIVE_LAYER", "1") != "0"
    return enabled() and _ON["layer"]


def set_layer_enabled(on: bool | None) -> None:
    """Force the fused decode layer on or off (None: decide from the environment again)."""
    _ON["layer"] = on


_KINDS = {torch.float32: 0, torch.bfloat16: 1, "int8": 2, "int4": 3}


@dataclass
class LayerWeights:
    """A decoder layer's weights and settings, as the fused step reads them (one rank's whole layer)."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    attn_scale: float
    in_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: object  # torch.Tensor or QuantizedWeight
    dense: object
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    qk_eps: float = 0.0
    biases: bool = False  # a QKV or output bias (not taken)
    mlp_gate_up: object = None  # the dense MLP, or the MoE layer's shared experts
    mlp_down: object = None
    router: torch.Tensor | None = None  # MoE layers: [E, H] float32
    router_bias: torch.Tensor | None = None
    w13: object = None
    w2: object = None
    top_k: int = 0
    score_function: str = "sigmoid"
    n_group: int | None = None
    topk_group: int | None = None
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0


class _Mat(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int), ("q", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("n", ctypes.c_int),
                ("k", ctypes.c_int), ("group", ctypes.c_int), ("parts", ctypes.c_void_p)]


_I, _F, _P = ctypes.c_int, ctypes.c_float, ctypes.c_void_p


class _Layer(ctypes.Structure):
    _fields_ = [(n, _I) for n in ("H", "nh", "nkv", "D", "half", "bf16", "norm_bf16")] + \
               [(n, _F) for n in ("eps", "qk_eps", "attn_scale")] + \
               [(n, _P) for n in ("in_norm", "post_norm", "q_norm", "k_norm")] + \
               [(n, _Mat) for n in ("qkv", "dense", "mlp_gate_up", "mlp_down")] + \
               [(n, _I) for n in ("moe", "E", "top_k", "softmax", "n_group", "topk_group", "norm_topk")] + \
               [("routed_scale", _F), ("router", _P), ("router_bias", _P), ("w13", _Mat), ("w2", _Mat)]


class _Step(ctypes.Structure):
    _fields_ = [("T", _I)] + [(n, _P) for n in ("h", "residual", "h_out", "res_out", "cos", "sin", "k_cache",
                                                 "v_cache")] + \
               [("kv_bf16", _I), ("block_size", _I), ("num_blocks", ctypes.c_int64), ("bt_stride", ctypes.c_int64)] + \
               [(n, _P) for n in ("block_tables", "context_lens", "slots")] + [("threads", _I), ("generic", _I)]


def _setup(lib) -> None:
    lib.p2m_decode_layer.restype = ctypes.c_int
    lib.p2m_decode_layer.argtypes = [ctypes.POINTER(_Layer), ctypes.POINTER(_Step)]


def _lib(group: int, head_dim: int):
    more = (_OPS_SRC, _QUANT_SRC, _MOE_SRC, _SRC)
    return _load(("decode_layer", group, head_dim), _LAYER_SRC, (f"P2M_G={group}", f"P2M_D={head_dim}"), _setup, more)


def _kind(w, dtype, lead: int) -> int | None:
    """The C kind of a weight (a tensor in the activation dtype, or an int8 / int4 QuantizedWeight the quantized
    kernels take; `lead` expert dims), or None (fp8 and any other format: the per-op path)."""
    if isinstance(w, torch.Tensor):
        ok = w.dtype == dtype and w.dim() == lead + 2 and w.is_contiguous() and w.device.type == "cpu"
        return _KINDS[dtype] if ok else None
    return _KINDS[w.method] if _quant_ok(w, lead) else None


def _mat(w, dtype, lead: int, pieces: int) -> _Mat | None:
    """The C description of weight w (`lead` expert dims; mapped.RowPieces: a gated MLP's or experts' matrices in
    `pieces` pieces each, 0 where the C code takes none), or None where it takes no such weight."""
    if w is None:
        return _Mat()
    if isinstance(w, RowPieces):
        where = expert_pointers(w.as_stack(), pieces) if pieces and w.dtype == dtype and w.dim() == lead + 2 \
            else None
        return None if where is None else _Mat(_KINDS[dtype], where[0], None, w.shape[-2], w.shape[-1], 0, where[1])
    kind = _kind(w, dtype, lead)
    if kind is None:
        return None
    if isinstance(w, torch.Tensor):
        return _Mat(kind, w.data_ptr(), None, w.shape[-2], w.shape[-1], 0)
    return _Mat(kind, w.qweight.data_ptr(), w.scale.data_ptr(), w.shape[-2], w.shape[-1], w.group_size)


def _layer_struct(lw: LayerWeights, dtype) -> _Layer | None:
    """The C description of the layer, or None where the fused step does not take it."""
    if lw.biases or lw.in_norm.dtype not in _DTYPES or lw.post_norm.dtype != lw.in_norm.dtype:
        return None
    if lw.q_norm is not None and lw.q_norm.dtype != lw.in_norm.dtype:
        return None
    pieces = {"mlp_gate_up": 2, "w13": 2, "mlp_down": 1, "w2": 1}  # taken in pieces: a gated MLP's matrices
    mats = {n: _mat(getattr(lw, n), dtype, int(n in ("w13", "w2")), pieces.get(n, 0))
            for n in ("qkv", "dense", "mlp_gate_up", "mlp_down", "w13", "w2")}
    if any(m is None for m in mats.values()) or (lw.mlp_gate_up is None) != (lw.mlp_down is None):
        return None
    moe = lw.w13 is not None
    if moe:
        e = lw.router.shape[0]
        if lw.router.dtype != torch.float32 or mats["w13"].kind != mats["w2"].kind or lw.score_function not in (
                "sigmoid", "softmax") or lw.w13.shape[0] != e:
            return None
        if lw.router_bias is not None and lw.router_bias.dtype != torch.float32:
            return None
        if mats["w13"].group != mats["w2"].group:
            return None
    elif lw.mlp_gate_up is None:
        return None
    grouped = moe and lw.n_group is not None and lw.topk_group is not None and lw.n_group > 1
    return _Layer(
        H=lw.hidden, nh=lw.heads, nkv=lw.kv_heads, D=lw.head_dim, half=0, bf16=_DTYPES[dtype],
        norm_bf16=_DTYPES[lw.in_norm.dtype], eps=lw.eps, qk_eps=lw.qk_eps, attn_scale=lw.attn_scale,
        in_norm=lw.in_norm.data_ptr(), post_norm=lw.post_norm.data_ptr(),
        q_norm=None if lw.q_norm is None else lw.q_norm.data_ptr(),
        k_norm=None if lw.k_norm is None else lw.k_norm.data_ptr(), **mats, moe=int(moe),
        E=lw.router.shape[0] if moe else 1, top_k=lw.top_k if moe else 1,
        softmax=int(lw.score_function == "softmax"), n_group=lw.n_group if grouped else 0,
        topk_group=lw.topk_group if grouped else 0, norm_topk=int(lw.norm_topk_prob),
        routed_scale=lw.routed_scaling_factor, router=lw.router.data_ptr() if moe else None,
        router_bias=None if not moe or lw.router_bias is None else lw.router_bias.data_ptr())


def _cached_layer(owner, lw: LayerWeights, dtype):
    """owner's C description for lw (kept on owner while it is given the same lw, model/native_layer.py's cached
    one, and dtype), or None."""
    cached = owner.__dict__.get("_p2m_native_layer")
    if cached is None or cached[2] is not lw or cached[0] != dtype:
        cached = (dtype, _layer_struct(lw, dtype), lw)  # lw keeps the tensors the struct points into alive
        owner.__dict__["_p2m_native_layer"] = cached
    return cached[1]


def decode_layer(owner, lw: LayerWeights, h, residual, cos, sin, k_cache, v_cache, block_tables, context_lens,
                 slots):
    """DecoderLayer.forward for a decode step (h [T, H]: one new token per sequence) in one call; None where the
    fused step does not take it. owner: the layer module (its C description is cached on it)."""
    if not layer_enabled() or h.device.type != "cpu" or h.dtype not in _DTYPES or h.dim() != 2:
        return None
    if not h.is_contiguous():
        return None
    t, dtype = h.shape[0], h.dtype
    if residual is not None and (residual.dtype != dtype or residual.shape != h.shape or not residual.is_contiguous()):
        return None
    if any(isinstance(w, (torch.Tensor, RowPieces)) for w in (lw.qkv, lw.dense, lw.mlp_gate_up, lw.w13)) \
            and t > _DENSE_ROWS:
        return None
    if (torch.is_grad_enabled() and h.requires_grad) or (lw.w13 is not None and not moe_enabled()):
        return None
    if k_cache.dtype not in _DTYPES or v_cache.dtype != k_cache.dtype or not (k_cache.is_contiguous()
                                                                               and v_cache.is_contiguous()):
        return None
    if cos is None or cos.dtype != torch.float32 or cos.shape[0] != t or 2 * cos.shape[1] > lw.head_dim:
        return None
    if k_cache.shape[2:] != (lw.kv_heads, lw.head_dim) or lw.heads % lw.kv_heads:
        return None
    layer = _cached_layer(owner, lw, dtype)
    lib = _lib(lw.heads // lw.kv_heads, lw.head_dim) if layer is not None else None
    if lib is None:
        return None
    layer.half = cos.shape[1]
    cos, sin = cos.contiguous(), sin.contiguous()
    tables = block_tables if block_tables.dtype == torch.int32 and block_tables.stride(1) == 1 else \
        block_tables.to(torch.int32).contiguous()
    lens = context_lens if context_lens.dtype == torch.int32 else context_lens.to(torch.int32)
    lens = lens.contiguous()
    slots = slots if slots.dtype == torch.int64 and slots.is_contiguous() else slots.to(torch.int64).contiguous()
    h_out, res_out = torch.empty_like(h), torch.empty_like(h)
    step = _Step(T=t, h=h.data_ptr(), residual=None if residual is None else residual.data_ptr(),
                 h_out=h_out.data_ptr(), res_out=res_out.data_ptr(), cos=cos.data_ptr(), sin=sin.data_ptr(),
                 k_cache=k_cache.data_ptr(), v_cache=v_cache.data_ptr(), kv_bf16=_DTYPES[k_cache.dtype],
                 block_size=k_cache.shape[1], num_blocks=k_cache.shape[0], bt_stride=tables.stride(0),
                 block_tables=tables.data_ptr(), context_lens=lens.data_ptr(), slots=slots.data_ptr(),
                 threads=torch.get_num_threads(), generic=int(_native_state["generic"]))
    err = lib.p2m_decode_layer(ctypes.byref(layer), ctypes.byref(step))
    if err:
        raise RuntimeError(f"native decode layer: {'an id out of range' if err == 1 else 'no memory'}")
    # The first layer's residual is h itself (as DecoderLayer.forward has it: the layer's input); here res_out.
    return h_out, res_out

