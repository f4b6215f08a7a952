"""Quantized weights into the model: the plan for a model, storage for its (meta-built) quantized weights, each
checkpoint tensor quantized or converted as it streams in, and random quantized weights for dummy loads.

Online quantization works on whole checkpoint tensors (one at a time: peak memory is the quantized model plus
one tensor in float32), and a tensor-parallel rank then takes its slice of the quantized tensor, so that
every rank holds exactly the codes and scales one process would (an int8 row split over ranks keeps the
row's one scale).
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from .formats import INT4_GROUP, QuantFormatError, QuantizedWeight, dequantize
from .layout import quantize_in_rows
from .plan import QuantPlan, int4_group
from .prequantized import QuantizedSource, read_checkpoint_quant


def make_plan(quantization: str | None, path: str | None, head: bool = False,
              files: list[str] | None = None, widths: list[int] | None = None) -> QuantPlan | None:
    """The model's plan: the checkpoint's own when it is pre-quantized (then `quantization`, if given, must name
    the same), else `quantization`'s, else None (nothing quantized). files: the checkpoint's weight files, read
    (names only) to learn which modules it stores quantized; None (dummy weights): every quantizable one.
    widths: the model's input widths (plan.input_widths), from which int4 takes its group (plan.int4_group)."""
    if quantization is not None:
        QuantPlan(quantization)  # names a bad option before anything is read
    stored = read_checkpoint_quant(path, files) if path else None
    if stored is None:
        if not quantization:
            return None
        return QuantPlan(quantization, head, int4_group(widths) if widths else INT4_GROUP)
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
    return quantize_in_rows(w, dest.method, group_size=dest.group_size or INT4_GROUP, block=dest.block)


def load_tensor(name: str, parts: list, src) -> None:
    """Copy checkpoint tensor `name` into its (destination, index) parts (checkpoint.Target). src: the tensor (a
    view of the memory-mapped file) or a QuantizedSource (pre-quantized); a destination: a tensor or a
    QuantizedWeight. A quantized
    destination of a plain tensor is quantized here (once for all its parts); a plain destination of a
    quantized tensor gets the dequantized weight."""
    full = None  # src as a QuantizedWeight, made on first need
    try:
        for dest, index in parts:
            if not isinstance(dest, QuantizedWeight) and not isinstance(src, QuantizedSource):
                dest.copy_(src[index] if index else src)
                continue
            if full is None:
                full = src.read() if isinstance(src, QuantizedSource) else _quantize_like(dest, src)
            piece = full[index] if index else full
            if isinstance(dest, QuantizedWeight):
                dest.copy_(piece)
            else:
                dest.copy_(dequantize(piece, dest.dtype))
    except QuantFormatError as e:
        raise QuantFormatError(f"tensor {name!r}: {e}") from None


def init_dummy(model: torch.nn.Module, seed: int, std: float) -> None:
    """Random quantized weights, matrix by matrix (each expert of a stack on its own): uniformly random codes,
    with scales that give the weights a standard deviation of `std`. Codes are drawn directly rather than
    floats drawn and quantized: for the 17B model that would take ~20 minutes on two CPU cores (random bytes:
    about a minute), and no matrix is ever held in high precision."""
    rng = np.random.default_rng(seed)
    for _, _, _, qw in quantized_weights(model):
        gen = torch.Generator(device=qw.device).manual_seed(seed) if qw.device.type == "cuda" else None
        for idx in itertools.product(*map(range, qw.shape[:-2])):
            piece = qw[idx] if idx else qw
            q = piece.qweight
            if gen is not None:
                raw = torch.randint(0, 256, q.shape, dtype=torch.uint8, device=q.device, generator=gen)
            else:
                raw = torch.from_numpy(rng.integers(0, 256, q.shape, dtype=np.uint8))
            q.copy_(_codes(raw, piece.method))
            piece.scale.fill_(std / _CODE_STD[piece.method])


def _codes(raw: torch.Tensor, method: str) -> torch.Tensor:
    """Uniformly random bytes as codes of `method`: int8 in [-127, 127]; int4 two nibbles as they are; fp8 with
    the exponent's top bit cleared (no NaN, |q| <= 1.875)."""
    if method == "int8":
        return raw.view(torch.int8).clamp_(-127, 127)
    if method == "fp8":
        return (raw & 0xBF).view(torch.float8_e4m3fn)
    return raw


def _code_std(method: str) -> float:
    """The standard deviation of the values _codes makes from uniformly random bytes (scale 1)."""
    raw = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    codes = _codes(raw.clone(), method)
    if method == "int4":
        values = torch.cat([(raw & 0xF).float() - 8, (raw >> 4).float() - 8])
    else:
        values = codes.float()
    return values.pow(2).mean().sqrt().item()


_CODE_STD = {m: _code_std(m) for m in ("int8", "int4", "fp8")}
