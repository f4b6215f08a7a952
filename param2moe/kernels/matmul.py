"""`linear(x, w, b)` = x @ w.T + b: F.linear, except on the CPU, where it runs oneDNN with a packed copy
of the weight.

Why: PyTorch's CPU builds do float32 matmuls with MKL, which on AMD processors runs its AVX2 code (about
200 GFLOP/s on two Zen 5 cores), while oneDNN, also in every x86 CPU build, uses AVX-512 and reaches
about 500 GFLOP/s once the weight is reordered into its blocked layout (`torch.ops.mkldnn`, the same
ops torch.compile's CPU backend uses). The result is the same float32 (or bfloat16) product, with a
different summation order.

A weight is packed on first use and the packed copy is kept on the weight tensor itself (attribute
`_p2m_onednn`), so it lives and dies with the model. The copy doubles the memory of packed weights:
packing stops once packed copies would pass a quarter of the machine's memory (the rest run F.linear).
`P2M_CPU_ONEDNN=0` in the environment turns packing off.
"""

from __future__ import annotations

import os
import weakref

import torch
import torch.nn.functional as F

from ..mapped import RowPieces

_ATTR = "_p2m_onednn"
_DTYPES = (torch.float32, torch.bfloat16)


def _budget() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 4 << 30


_state = {"enabled": None, "packed_bytes": 0, "budget": None}


def onednn_enabled() -> bool:
    if _state["enabled"] is None:
        ok = os.environ.get("P2M_CPU_ONEDNN", "1") != "0" and torch.backends.mkldnn.is_available()
        ok = ok and hasattr(torch.ops.mkldnn, "_linear_pointwise") and hasattr(torch.ops.mkldnn,
                                                                                 "_reorder_linear_weight")
        _state["enabled"], _state["budget"] = ok, _budget()
    return _state["enabled"]


def set_onednn(enabled: bool | None) -> None:
    """Force oneDNN packing on or off (None: decide from the environment and the build again)."""
    _state["enabled"] = enabled
    if enabled is not None and _state["budget"] is None:
        _state["budget"] = _budget()


def _pack(w: torch.Tensor) -> torch.Tensor | None:
    nbytes = w.numel() * w.element_size()
    if _state["packed_bytes"] + nbytes > _state["budget"]:
        return None
    _state["packed_bytes"] += nbytes
    return torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), None)


def _release(nbytes: int) -> None:
    _state["packed_bytes"] -= nbytes


def packed_weight(w: torch.Tensor, index: int | None = None) -> torch.Tensor | None:
    """The packed copy of w (of w[index] for a stack of weights [E, N, K]), made on first use; None when
    oneDNN is not to be used for it."""
    if w.device.type != "cpu" or w.dtype not in _DTYPES or not onednn_enabled():
        return None
    cached = getattr(w, _ATTR, None)
    if cached is None:
        before = _state["packed_bytes"]
        with torch.no_grad():
            cached = _pack(w) if index is None else [_pack(w[e]) for e in range(w.shape[0])]
        if cached is None or (index is not None and any(p is None for p in cached)):
            cached = False  # over the budget: remember not to try again
        weakref.finalize(w, _release, _state["packed_bytes"] - before)
        setattr(w, _ATTR, cached)
    if cached is False:
        return None
    return cached if index is None else cached[index]


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *,
           index: int | None = None) -> torch.Tensor:
    """x @ W.T + bias, where W is w, or w[index] when w stacks several weights ([E, N, K]); w may be
    mapped.RowPieces (a matmul a piece, each piece packed)."""
    if isinstance(w, RowPieces):
        return w.linear(x, index, bias, linear=linear)
    packed = packed_weight(w, index) if x.dtype == w.dtype else None
    if packed is None:
        return F.linear(x, w if index is None else w[index], bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
