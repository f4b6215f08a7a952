"""Quantized weights into the model: the plan for a model, storage for its (meta-built) quantized weights, each
checkpoint tensor quantized or converted as it streams in, and random quantized weights for dummy loads.

Online quantization works on whole checkpoint tensors (one at a time: peak memory is the quantized model plus
one tensor in float32), and a tensor-parallel rank then takes its slice of the quantized tensor, so that
every rank holds exactly the codes and scales one process would (an int8 row split over ranks keeps the
row's one scale).
"""

from __future__ import annotations

import itertools

import torch

from .formats import INT4_GROUP, QuantFormatError, QuantizedWeight, dequantize, quantize
from .plan import QuantPlan
from .prequantized import QuantizedSource, read_checkpoint_quant


def make_plan(quantization: str | None, path: str | None, head: bool = False,
              files: list[str] | None = None) -> QuantPlan | None:
    """The model's plan: the checkpoint's own when it is pre-quantized (then `quantization`, if given, must name
    the same), else `quantization`'s, else None (nothing quantized). files: the checkpoint's weight files, read
    (names only) to learn which modules it stores quantized; None (dummy weights): every quantizable one."""
    if quantization is not None:
        QuantPlan(quantization)  # names a bad option before anything is read
    stored = read_checkpoint_quant(path, files) if path else None
    if stored is None:
        return QuantPlan(quantization, head) if quantization else None
    if quantization and quantization != stored.option:
        raise QuantFormatError(f"quantization={quantization!r}, but the checkpoint at {path} is pre-quantized as "
                               f"{stored.option} ({stored.describe()}); leave quantization unset or give "
                               f"{stored.option!r}")
    return QuantPlan(stored.option, head, stored.group_size, stored.quantized if files is not None else None)


def quantized_weights(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, str, QuantizedWeight]]:
    """(qualified name, module, attribute, weight) of every quantized weight the model holds."""
    return [(f"{prefix}.{attr}" if prefix else attr, module, attr, value)
            for prefix, module in model.named_modules() for attr, value in vars(module).items()
            if isinstance(value, QuantizedWeight)]


def materialize(model: torch.nn.Module, device) -> None:
    """Give every quantized weight built on the meta device uninitialised storage on `device`."""
    for _, module, attr, qw in quantized_weights(model):
        if qw.qweight.is_meta:
            setattr(module, attr, QuantizedWeight(qw.method, torch.empty_like(qw.qweight, device=device),
                                                  torch.empty_like(qw.scale, device=device), qw.shape, qw.group_size))


def _quantize_like(dest: QuantizedWeight, w: torch.Tensor) -> QuantizedWeight:
    return quantize(w, dest.method, group_size=dest.group_size or INT4_GROUP, block=dest.block)


def load_tensor(name: str, parts: list, src) -> None:
    """Copy checkpoint tensor `name` into its (destination, index) parts (checkpoint.Target). src: a safetensors
    slice or a QuantizedSource (pre-quantized); a destination: a tensor or a QuantizedWeight. A quantized
    destination of a plain tensor is quantized here (once for all its parts); a plain destination of a
    quantized tensor gets the dequantized weight."""
    full = None  # src as a QuantizedWeight, made on first need
    try:
        for dest, index in parts:
            if not isinstance(dest, QuantizedWeight) and not isinstance(src, QuantizedSource):
                dest.copy_(src[index] if index else src[:])
                continue
            if full is None:
                full = src.read() if isinstance(src, QuantizedSource) else _quantize_like(dest, src[:])
            piece = full[index] if index else full
            if isinstance(dest, QuantizedWeight):
                dest.copy_(piece)
            else:
                dest.copy_(dequantize(piece, dest.dtype))
    except QuantFormatError as e:
        raise QuantFormatError(f"tensor {name!r}: {e}") from None


def init_dummy(model: torch.nn.Module, gen: torch.Generator, std: float) -> None:
    """Random quantized weights: each matrix (each expert of a stack) drawn in float32 and quantized on its own,
    so that no more than one matrix is ever held in high precision."""
    for _, _, _, qw in quantized_weights(model):
        for idx in itertools.product(*map(range, qw.shape[:-2])):
            piece = qw[idx] if idx else qw
            w = torch.empty(piece.shape, device=qw.device).normal_(0.0, std, generator=gen)
            piece.copy_(_quantize_like(piece, w))
