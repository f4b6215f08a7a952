"""The quantized weight format: what a quantized matrix (or a stack of expert matrices) holds in memory.

Every kernel (Triton on GPUs, native C on CPUs) and every loader reads and writes this one layout; the
plain torch `dequantize` below is the oracle they are tested against. A weight of logical shape
[..., N, K] (N output rows, K input columns; leading dims stack experts) is, by method:

  int8  weight-only, symmetric, per output channel
        qweight int8 [..., N, K];        scale float32 [..., N];             w = q * scale[..., :, None]
  int4  weight-only, symmetric, group-wise along K (group_size, default 128)
        qweight uint8 [..., N, K // 2]: byte j holds column 2j in its low nibble and 2j+1 in its high
        nibble, each stored as q + 8 with q in [-8, 7];
        scale float32 [..., N, K // group_size];                             w = q * scale[..., n, k // g]
  fp8   float8_e4m3fn weights, per output channel or in 128x128 blocks (DeepSeek-V3 / Qwen3-FP8 layout)
        qweight float8_e4m3fn [..., N, K]; scale float32 [..., N] (per channel) or
        [..., ceil(N / 128), ceil(K / 128)] (block);                         w = q * scale (broadcast)

Quantization is round-to-nearest with scale = max|w| / qmax over the channel, group or block (qmax 127,
7 and 448); an all-zero channel gets scale 1 so that nothing divides by zero.

Indexing a QuantizedWeight (`qw[e]`, `qw[a:b]`, `qw[:, a:b]`) works as on the weight it stands for, along
the leading (expert) dims, the rows N and the columns K, and returns views that share the storage: the
loader writes through them, tensor-parallel ranks take their slices with them. Rows and columns are cut
where the scales allow: int4 columns at group boundaries, fp8 block rows and columns at block boundaries
(QuantFormatError otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

METHODS = ("int8", "int4", "fp8")
FP8_MAX = 448.0
FP8_BLOCK = 128
INT4_GROUP = 128


class QuantFormatError(ValueError):
    """A quantized tensor breaks the format; the message names the tensor."""


@dataclass
class QuantizedWeight:
    method: str                # "int8" | "int4" | "fp8"
    qweight: torch.Tensor
    scale: torch.Tensor
    shape: tuple[int, ...]     # the logical (dequantized) shape [..., N, K]
    group_size: int = 0        # int4: columns per scale; fp8 block: FP8_BLOCK; else 0

    @property
    def block(self) -> bool:
        """fp8 with 128x128 block scales (rather than one scale per output channel)."""
        return self.method == "fp8" and self.scale.dim() == self.qweight.dim()

    @property
    def out_features(self) -> int:
        return self.shape[-2]

    @property
    def in_features(self) -> int:
        return self.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def nbytes(self) -> int:
        return self.qweight.numel() * self.qweight.element_size() + self.scale.numel() * self.scale.element_size()

    def to(self, device) -> QuantizedWeight:
        return QuantizedWeight(self.method, self.qweight.to(device), self.scale.to(device), self.shape,
                               self.group_size)

    def __getitem__(self, key) -> QuantizedWeight:
        """A view, indexed as the dequantized weight would be (see the module docstring)."""
        key = key if isinstance(key, tuple) else (key,)
        nd = len(self.shape)
        if len(key) > nd:
            raise IndexError(f"too many indices ({len(key)}) for a quantized weight of shape {list(self.shape)}")
        qw = self
        for dim, k in reversed(list(enumerate(key))):  # the last first: earlier dims keep their meaning
            qw = _index(qw, dim - nd, k)
        return qw

    def copy_(self, src: QuantizedWeight) -> QuantizedWeight:
        """Write src's codes and scales into this weight's storage (same method, shape and scales layout)."""
        same = (src.method, src.shape, src.group_size, src.block) == (self.method, self.shape, self.group_size,
                                                                     self.block)
        if not same:
            raise QuantFormatError(f"cannot copy a {src.describe()} weight of shape {list(src.shape)} into a "
                                   f"{self.describe()} weight of shape {list(self.shape)}")
        self.qweight.copy_(src.qweight)
        self.scale.copy_(src.scale)
        return self

    def describe(self) -> str:
        """The method with its scales' layout, e.g. "int4 (group 128)"."""
        if self.method == "int4":
            return f"int4 (group {self.group_size})"
        if self.method == "fp8":
            return "fp8 (128x128 blocks)" if self.block else "fp8 (per channel)"
        return f"{self.method} (per channel)"

    def validate(self, name: str = "weight") -> None:
        """Raise QuantFormatError naming `name` if dtypes or shapes do not fit the method."""
        *lead, n, k = self.shape
        want = _expected(self.method, tuple(lead), n, k, self.group_size, self.block)
        got = (self.qweight.dtype, tuple(self.qweight.shape), tuple(self.scale.shape))
        if got != want:
            raise QuantFormatError(f"{name}: {self.method} weight of shape {list(self.shape)} needs qweight "
                                   f"{want[0]} {list(want[1])} and scale {list(want[2])}; got qweight {got[0]} "
                                   f"{list(got[1])} and scale {list(got[2])}")
        if self.scale.dtype != torch.float32:
            raise QuantFormatError(f"{name}: scale must be float32, got {self.scale.dtype}")


def _expected(method, lead, n, k, group_size, block):
    if method == "int8":
        return torch.int8, (*lead, n, k), (*lead, n)
    if method == "int4":
        if k % 2 or not group_size or k % group_size:
            raise QuantFormatError(f"int4 needs K ({k}) even and a multiple of the group size ({group_size})")
        return torch.uint8, (*lead, n, k // 2), (*lead, n, k // group_size)
    if method == "fp8":
        scale = (*lead, -(-n // FP8_BLOCK), -(-k // FP8_BLOCK)) if block else (*lead, n)
        return torch.float8_e4m3fn, (*lead, n, k), scale
    raise QuantFormatError(f"unknown quantization method {method!r}; expected one of {', '.join(METHODS)}")


def empty(shape, method: str, *, group_size: int = INT4_GROUP, block: bool = False, device=None) -> QuantizedWeight:
    """An uninitialised quantized weight of logical shape [..., N, K] (the loader fills it)."""
    *lead, n, k = shape
    group_size = group_size if method == "int4" else FP8_BLOCK if method == "fp8" and block else 0
    qdtype, qshape, sshape = _expected(method, tuple(lead), n, k, group_size, block)
    return QuantizedWeight(method, torch.empty(qshape, dtype=qdtype, device=device),
                           torch.empty(sshape, dtype=torch.float32, device=device), tuple(shape), group_size)


def quantize(w: torch.Tensor, method: str, *, group_size: int = INT4_GROUP, block: bool = False) -> QuantizedWeight:
    """Quantize w [..., N, K] (any float dtype) to `method`. fp8: block=True for 128x128 block scales."""
    w = w.float()
    *lead, n, k = w.shape
    if method == "int8":
        scale = _safe(w.abs().amax(-1) / 127)
        q = torch.round(w / scale[..., None]).clamp_(-127, 127).to(torch.int8)
        return QuantizedWeight("int8", q, scale, tuple(w.shape))
    if method == "int4":
        if k % group_size:
            raise QuantFormatError(f"int4: K = {k} is not a multiple of the group size {group_size}")
        g = w.reshape(*lead, n, k // group_size, group_size)
        scale = _safe(g.abs().amax(-1) / 7)
        q = torch.round(g / scale[..., None]).clamp_(-8, 7).reshape(*lead, n, k).to(torch.int16) + 8
        packed = (q[..., 0::2] | (q[..., 1::2] << 4)).to(torch.uint8)
        return QuantizedWeight("int4", packed, scale, tuple(w.shape), group_size)
    if method == "fp8":
        if block:
            scale = _safe(_block_absmax(w) / FP8_MAX)
            q = (w / _expand_blocks(scale, n, k)).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            return QuantizedWeight("fp8", q, scale, tuple(w.shape), FP8_BLOCK)
        scale = _safe(w.abs().amax(-1) / FP8_MAX)
        q = (w / scale[..., None]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return QuantizedWeight("fp8", q, scale, tuple(w.shape))
    raise QuantFormatError(f"unknown quantization method {method!r}; expected one of {', '.join(METHODS)}")


def dequantize(qw: QuantizedWeight, dtype=torch.float32) -> torch.Tensor:
    """The oracle: the weight the quantized one stands for, [..., N, K] in `dtype`."""
    *lead, n, k = qw.shape
    if qw.method == "int8":
        w = qw.qweight.float() * qw.scale[..., None]
    elif qw.method == "int4":
        b = qw.qweight.to(torch.int16)
        q = torch.stack(((b & 0xF) - 8, (b >> 4) - 8), dim=-1).reshape(*lead, n, k).float()
        w = (q.reshape(*lead, n, k // qw.group_size, qw.group_size) * qw.scale[..., None]).reshape(*lead, n, k)
    elif qw.method == "fp8":
        scale = _expand_blocks(qw.scale, n, k) if qw.block else qw.scale[..., None]
        w = qw.qweight.float() * scale
    else:
        raise QuantFormatError(f"unknown quantization method {qw.method!r}")
    return w.to(dtype)


def _index(qw: QuantizedWeight, dim: int, key) -> QuantizedWeight:
    """qw indexed by key along dim (negative: -1 the columns K, -2 the rows N, below that leading dims)."""
    if dim < -2:  # a leading (expert) dim: codes and scales alike
        pos = len(qw.shape) + dim
        sel = (slice(None),) * pos + (key,)
        shape = list(qw.shape)
        if isinstance(key, int):
            del shape[pos]
        else:
            shape[pos] = len(range(*key.indices(shape[pos])))
        return QuantizedWeight(qw.method, qw.qweight[sel], qw.scale[sel], tuple(shape), qw.group_size)
    if not isinstance(key, slice) or key.step not in (None, 1):
        raise IndexError(f"a quantized weight's rows and columns are cut by plain slices, got {key!r}")
    size = qw.shape[dim]
    a, b, _ = key.indices(size)
    b = max(a, b)
    if (a, b) == (0, size):
        return qw
    shape = list(qw.shape)
    shape[dim] = b - a
    unit = FP8_BLOCK if qw.block else qw.group_size if (qw.method == "int4" and dim == -1) else 1
    if a % unit or (b % unit and b != size):
        what = "rows" if dim == -2 else "columns"
        raise QuantFormatError(f"{qw.describe()} weight of shape {list(qw.shape)}: {what} {a}:{b} do not start and "
                               f"end on its scales' boundaries (multiples of {unit})")
    q = qw.qweight
    s = qw.scale
    if dim == -2:
        q = q[..., a:b, :]
        if qw.block:
            s = s[..., a // unit:-(-b // unit), :]
        else:
            s = s[..., a:b, :] if qw.method == "int4" else s[..., a:b]
    else:
        q = q[..., a // 2:b // 2] if qw.method == "int4" else q[..., a:b]
        if qw.method == "int4" or qw.block:
            s = s[..., a // unit:-(-b // unit)]
    return QuantizedWeight(qw.method, q, s, tuple(shape), qw.group_size)


def _safe(scale: torch.Tensor) -> torch.Tensor:
    return torch.where(scale > 0, scale, torch.ones_like(scale)).float()


def _block_absmax(w: torch.Tensor) -> torch.Tensor:
    *lead, n, k = w.shape
    nb, kb = -(-n // FP8_BLOCK), -(-k // FP8_BLOCK)
    padded = torch.zeros(*lead, nb * FP8_BLOCK, kb * FP8_BLOCK, dtype=w.dtype, device=w.device)
    padded[..., :n, :k] = w.abs()
    return padded.reshape(*lead, nb, FP8_BLOCK, kb, FP8_BLOCK).amax(dim=(-3, -1))


def _expand_blocks(scale: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Block scales [..., nb, kb] spread to one per element [..., n, k]."""
    return scale.repeat_interleave(FP8_BLOCK, -2)[..., :n, :].repeat_interleave(FP8_BLOCK, -1)[..., :k]
