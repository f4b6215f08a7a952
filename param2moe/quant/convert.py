"""Conversion between our quantized format (formats.py) and the checkpoint formats of prequantized.py: one
quantized checkpoint weight's tensors to a QuantizedWeight (checking every shape, dtype and scale, naming the
tensor at fault), and a QuantizedWeight to the compressed-tensors tensors `param2moe quantize` writes."""

from __future__ import annotations

import torch

from .formats import FP8_BLOCK, QuantFormatError, QuantizedWeight

_PACK_BITS = {"int4": 4, "int8": 8}


def from_checkpoint(cq, module: str, t: dict[str, torch.Tensor], shape: list[int]) -> QuantizedWeight:
    """The QuantizedWeight for checkpoint module `module` from its tensors t (leaf name -> tensor); cq: the
    checkpoint's CheckpointQuant. shape: the logical [N, K]."""
    if len(shape) != 2:
        raise QuantFormatError(f"{module}: a quantized weight must be a matrix, got shape {shape}")
    for leaf, why in (("weight_zero_point", "zero points (asymmetric weights)"),
                      ("weight_g_idx", "activation reordering (g_idx)")):
        if leaf in t:
            raise QuantFormatError(f"{module}.{leaf}: {why} are not supported")
    n, k = shape
    method = "fp8" if cq.option == "fp8-block" else cq.option
    if cq.format == "pack-quantized":
        q = _unpack(t["weight_packed"], _PACK_BITS[method], n, k, f"{module}.weight_packed")
    else:
        want = torch.int8 if method == "int8" else torch.float8_e4m3fn
        q = t.get("weight")
        if q is None or q.dtype != want or tuple(q.shape) != (n, k):
            got = "missing" if q is None else f"{q.dtype} {list(q.shape)}"
            raise QuantFormatError(f"{module}.weight: expected {want} [{n}, {k}] ({cq.describe()}), got {got}")
    leaf = "weight_scale_inv" if cq.format == "fp8" and cq.option == "fp8-block" else "weight_scale"
    if leaf not in t:
        raise QuantFormatError(f"{module}.{leaf} is missing: every quantized weight needs its scale ({cq.describe()})")
    group = (cq.group_size or k) if method == "int4" else 0
    scale = _scale(t[leaf], cq.option, n, k, group, f"{module}.{leaf}")
    qw = QuantizedWeight(method, q, scale, (n, k), FP8_BLOCK if cq.option == "fp8-block" else group)
    qw.validate(module)
    return qw


def _scale(s: torch.Tensor, option: str, n: int, k: int, group: int, name: str) -> torch.Tensor:
    """A checkpoint scale in our layout (float32): per channel [N], per group [N, K/g], per block [nb, kb]."""
    if not (s.is_floating_point() and s.dtype != torch.float8_e4m3fn):
        raise QuantFormatError(f"{name}: scales must be floating point, got {s.dtype}")
    s = s.float()
    if option in ("int8", "fp8"):
        if s.numel() == 1:  # one scale for the whole tensor: the same for every channel
            s = s.reshape(1).expand(n).contiguous()
        want = [(n,), (n, 1)]
    elif option == "int4":
        if k % group:
            raise QuantFormatError(f"{name}: the group size {group} does not divide the {k} input columns")
        want = [(n, k // group)]
    else:
        want = [(-(-n // FP8_BLOCK), -(-k // FP8_BLOCK))]
    if tuple(s.shape) not in want:
        raise QuantFormatError(f"{name}: shape {list(s.shape)} does not fit a {option} weight of shape [{n}, {k}] "
                               f"(expected {' or '.join(str(list(w)) for w in want)})")
    if not torch.isfinite(s).all() or (s < 0).any():
        raise QuantFormatError(f"{name}: scales must be finite and non-negative (found "
                               f"{'non-finite' if not torch.isfinite(s).all() else 'negative'} values)")
    return s.reshape(n) if option in ("int8", "fp8") else s


def _unpack(packed: torch.Tensor, bits: int, n: int, k: int, name: str) -> torch.Tensor:
    """compressed-tensors int32 packing -> our int8 codes [N, K] (bits 8) or two int4 to a byte [N, K/2]."""
    per = 32 // bits
    want = (n, -(-k // per))
    if packed.dtype != torch.int32 or tuple(packed.shape) != want:
        raise QuantFormatError(f"{name}: expected int32 {list(want)} ({per} {bits}-bit values per int32 for a "
                               f"[{n}, {k}] weight), got {packed.dtype} {list(packed.shape)}")
    if bits == 4 and k % 2:
        raise QuantFormatError(f"{name}: int4 weights need an even number of input columns, got {k}")
    shifts = torch.arange(per, dtype=torch.int32) * bits
    codes = ((packed[..., None] >> shifts) & ((1 << bits) - 1)).reshape(n, -1)[:, :k]  # unsigned, q + 2^(bits-1)
    if bits == 8:
        return (codes - 128).to(torch.int8)
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)  # our bytes hold the same q + 8


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes [N, K] -> int32 [N, ceil(K / (32 / bits))], the first value in the lowest bits."""
    per = 32 // bits
    n, k = codes.shape
    padded = torch.zeros(n, -(-k // per) * per, dtype=torch.int64)
    padded[:, :k] = codes
    words = (padded.reshape(n, -1, per) << (torch.arange(per, dtype=torch.int64) * bits)).sum(-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)  # two's complement


def to_compressed(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """A matrix's compressed-tensors tensors (leaf name -> tensor): pack-quantized for int4 / int8,
    float-quantized for fp8. Scales stay float32, so the checkpoint reads back to exactly qw."""
    n, k = qw.shape
    if qw.method == "fp8":
        return {"weight": qw.qweight, "weight_scale": qw.scale if qw.block else qw.scale[:, None]}
    if qw.method == "int8":
        codes = qw.qweight.to(torch.int64) + 128
        scale = qw.scale[:, None]
    else:
        b = qw.qweight.to(torch.int64)
        codes = torch.stack((b & 0xF, b >> 4), dim=-1).reshape(n, k)
        scale = qw.scale
    return {"weight_packed": _pack(codes, _PACK_BITS[qw.method]), "weight_scale": scale,
            "weight_shape": torch.tensor([n, k], dtype=torch.int64)}
