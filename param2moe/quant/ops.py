"""The network's matrix products with quantized weights: each tries the device's kernel, else the plain torch
path (dequantize, then matmul), which is also the oracle the kernels are tested against.

`kernels/__init__.py` routes a QuantizedWeight here (one isinstance check in each of its linear, mlp,
moe_experts and logits). The kernels plug in through this small interface, imported on first use and
optional (absent, or declining the inputs: the torch path):

  CUDA  module `param2moe.kernels.triton.quant` (docs/quant-kernels.md):
          usable(x, qw) -> bool                       whether its kernels take x [T, K] and a matrix qw [N, K]
          moe_usable(x, w13, w2) -> bool              the same for the fused MoE (asked once per weights)
          linear(x, qw, bias=None, out_dtype=None)    [T, N] in x.dtype (out_dtype float32: the head)
          moe_experts(x, w13, w2, weights, ids, unsummed=False, num_appended=0, started=None)
                                                      [T, H] summed over each token's experts, x.dtype
                                                      (unsummed: [T*K, H], a row per (token, k) pair)
          runs_behind_router(x, w13) -> bool          whether gate_up_one_token takes one token x and w13
          gate_up_one_token(x, w13, ids, norm, pdl, inter)
                                                      the gate/up launched behind the router (moe.py's
                                                      add_rms_norm_gate_route_gate_up); started=inter above
          one_expert(qw) -> QuantizedWeight            qw [N, K] as a stack [1, N, K] (a view; mlp_one_token)
        These run inside CUDA graphs: no host synchronisation.
  CPU   `param2moe.kernels.cpu`: quant_linear(x, qw, bias, out_dtype=None), quant_mlp(x, gate_up, down) and
        quant_moe(x, w13, w2, weights, ids): the same results, or None where they do not take the inputs (no
        compiler, a method they lack, turned off).

w13 [E, 2W, H] (gate rows, then up rows) and w2 [E, H, W] are QuantizedWeights with a leading expert dim;
weights [T, K] float32, ids [T, K] (-1: no expert, as with expert parallelism). native=False (the "torch"
backend): the torch path only.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from ..kernels.moe import silu_and_mul
from .formats import FP8_BLOCK, QuantizedWeight, dequantize

_KERNELS: dict = {}
# Rows dequantized at a time by the torch path's linear (bounds its temporary copy: 16M weights).
_CHUNK = 1 << 24


def _module(name: str):
    """The kernel module `name`, imported on first use; None where it is missing."""
    mod = _KERNELS.get(name, False)
    if mod is False:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            mod = None
        _KERNELS[name] = mod
    return mod


def _triton(x, qw: QuantizedWeight, native: bool):
    """The Triton quant module when its linear takes x and the matrix qw, else None."""
    if not (native and x.is_cuda):
        return None
    t = _module("param2moe.kernels.triton.quant")
    return t if t is not None and t.usable(x, qw) else None


_MOE_OK: dict = {}  # (id(w13), id(w2), dtype, device) -> (w13, w2, whether the Triton MoE takes them)


def _triton_moe(x, w13: QuantizedWeight, w2: QuantizedWeight, native: bool):
    """The Triton quant module when its fused MoE takes x and these experts, else None. Its check allocates on
    the device, so it runs once per weights and activation dtype (eagerly, before any graph capture), not per
    call (which would add launches to every captured step)."""
    if not (native and x.is_cuda):
        return None
    t = _module("param2moe.kernels.triton.quant")
    if t is None:
        return None
    key = (id(w13), id(w2), x.dtype, x.device)
    if key not in _MOE_OK:  # (the weights are kept with the answer: their ids stay theirs)
        _MOE_OK[key] = (w13, w2, t.moe_usable(x, w13, w2))
    return t if _MOE_OK[key][2] else None


def _cpu(x, native: bool, name: str):
    """The native CPU function `name` when it may run on x, else None."""
    if not (native and x.device.type == "cpu"):
        return None
    cpu = _module("param2moe.kernels.cpu")
    return getattr(cpu, name, None) if cpu is not None else None


# ------------------------------------------------------------------ the interface kernels/__init__ calls
def linear(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None, *, native: bool = True,
           out_dtype=None):
    """x @ W.T + bias with W = dequantize(qw), in out_dtype (default x.dtype)."""
    if (t := _triton(x, qw, native)) is not None:
        return t.linear(x, qw, bias, out_dtype=out_dtype)
    if (fn := _cpu(x, native, "quant_linear")) is not None and (y := fn(x, qw, bias, out_dtype=out_dtype)) is not None:
        return y
    y = torch_linear(x, qw, bias)
    return y if out_dtype is None else y.to(out_dtype)


def logits(hidden: torch.Tensor, qw: QuantizedWeight, *, native: bool = True) -> torch.Tensor:
    """hidden @ W.T in float32 (the head; see kernels.Kernels.logits for why float32). The torch path multiplies
    in float32."""
    f32 = torch.float32
    if (t := _triton(hidden, qw, native)) is not None:
        return t.linear(hidden, qw, out_dtype=f32)
    fn = _cpu(hidden, native, "quant_linear")
    if fn is not None and (y := fn(hidden, qw, None, out_dtype=f32)) is not None:
        return y
    return torch_linear(hidden.float(), qw)


def mlp(x: torch.Tensor, gate_up: QuantizedWeight, down: QuantizedWeight, *, native: bool = True):
    """down(silu(gate(x)) * up(x)), gate and up rows stacked in gate_up (one native call on a CPU)."""
    if (fn := _cpu(x, native, "quant_mlp")) is not None and (y := fn(x, gate_up, down)) is not None:
        return y
    return linear(silu_and_mul(linear(x, gate_up, native=native)), down, native=native)


def gate_up_behind_router(x, w13: QuantizedWeight, *, native: bool = True):
    """The CUDA kernel's one-token gate/up to launch behind the router (a function for
    moe.add_rms_norm_gate_route_gate_up), or None where it does not take x [1, H] and these experts."""
    if not (native and x.is_cuda):
        return None
    t = _module("param2moe.kernels.triton.quant")
    return t.gate_up_one_token if t is not None and t.runs_behind_router(x, w13) else None


def moe_experts(x, w13: QuantizedWeight, w2: QuantizedWeight, weights, ids, *, native: bool = True,
                num_appended: int = 0, started=None):
    """sum_k weights[t, k] * Expert_{ids[t, k]}(x[t]), [T, H] in x.dtype. num_appended: the last columns of ids
    are the folded shared expert's pieces (MoE.fold_shared_experts), which the CUDA kernel starts early.
    started: the gate/up's output, launched behind the router (`gate_up_behind_router`); the torch paths
    compute it again."""
    if (t := _triton_moe(x, w13, w2, native)) is not None:
        return t.moe_experts(x, w13, w2, weights, ids, num_appended=num_appended, started=started)
    if (fn := _cpu(x, native, "quant_moe")) is not None and (y := fn(x, w13, w2, weights, ids)) is not None:
        return y
    return torch_moe_experts(x, w13, w2, weights, ids)


def mlp_one_token(x, gate_up: QuantizedWeight, down: QuantizedWeight, weights, ids, *, native: bool = True,
                  unsummed: bool = False):
    """mlp at one token as one expert of weight 1 (weights [[1.0]], ids [[0]]): the CUDA kernel's one-token expert
    path, two launches (gate/up with SiLU-and-mul, down), unsummed as moe_pairs; None where no kernel takes it."""
    if (t := _triton(x, gate_up, native)) is not None:
        return t.moe_experts(x, t.one_expert(gate_up), t.one_expert(down), weights, ids, unsummed=unsummed)
    return None


def moe_pairs(x, w13: QuantizedWeight, w2: QuantizedWeight, weights, ids, *, native: bool = True,
              num_appended: int = 0, started=None):
    """moe_experts' rows before the sum, [T*K, H] (row t*K + k: the pair (t, k); rows of id -1 undefined), for
    the next norm to sum in its launch (kernels.ExpertOutputs); None where no kernel gives them (then call
    moe_experts)."""
    if (t := _triton_moe(x, w13, w2, native)) is not None:
        return t.moe_experts(x, w13, w2, weights, ids, unsummed=True, num_appended=num_appended, started=started)
    return None


# ------------------------------------------------------------------ the torch path (the oracle)
def torch_linear(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear on the dequantized weight, a slice of rows at a time for large weights (bounded memory)."""
    n, k = qw.shape
    if n * k <= _CHUNK:
        return F.linear(x, dequantize(qw, x.dtype), bias)
    step = max(FP8_BLOCK, _CHUNK // k // FP8_BLOCK * FP8_BLOCK)  # whole fp8 blocks of rows
    y = torch.cat([F.linear(x, dequantize(qw[a:a + step], x.dtype)) for a in range(0, n, step)], dim=-1)
    return y if bias is None else y + bias


def torch_moe_experts(x, w13: QuantizedWeight, w2: QuantizedWeight, weights, ids,
                      every_expert: bool | None = None) -> torch.Tensor:
    """The experts one at a time, each dequantized on its own (memory stays at one expert's weights). The
    pairs go by expert and each token's results add up in float32 by ascending expert, as in
    kernels.moe.moe_experts. every_expert (default: inside a CUDA graph capture, where no host sync is
    allowed): every expert runs on every token, weighted by its share (zero for tokens that did not choose it)."""
    t, k = ids.shape
    y = torch.zeros(t, w2.shape[1], dtype=torch.float32, device=x.device)
    if every_expert is None:
        every_expert = x.is_cuda and torch.cuda.is_current_stream_capturing()
    if every_expert:
        for e in range(w13.shape[0]):
            share = (weights * (ids == e)).sum(-1, keepdim=True)
            y.add_(_expert(x, w13[e], w2[e]).float() * share)
        return y.to(x.dtype)
    flat = ids.reshape(-1)
    order = flat.argsort(stable=True)  # -1 first, then expert 0, 1, ...
    counts = torch.bincount(flat[flat >= 0], minlength=w13.shape[0]).tolist()
    order = order[t * k - sum(counts):]
    token, pair_weights = order // k, weights.reshape(-1)[order]
    start = 0
    for e, c in enumerate(counts):
        if c:
            rows = token[start:start + c]
            out = _expert(x.index_select(0, rows), w13[e], w2[e]).float()
            y.index_add_(0, rows, out.mul_(pair_weights[start:start + c, None]))
            start += c
    return y.to(x.dtype)


def _expert(x, w13: QuantizedWeight, w2: QuantizedWeight) -> torch.Tensor:
    return F.linear(silu_and_mul(F.linear(x, dequantize(w13, x.dtype))), dequantize(w2, x.dtype))
