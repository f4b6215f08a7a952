"""A safetensors file, memory-mapped: its tensors are views of the mapping (nothing is read until a tensor is
copied out of it), and the pages of a tensor already copied are given back, so that loading holds the
model's parameters and little more, whatever the size of the files.

The format: 8 bytes (little-endian length n), n bytes of JSON ({name: {dtype, shape, data_offsets}}, and
an optional "__metadata__"), then the data, each tensor's bytes at data_offsets from there."""

from __future__ import annotations

import json
import mmap
import os
import struct
import sys
import warnings

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
          "F8_E5M2": getattr(torch, "float8_e5m2", None)}
_PAGE = mmap.PAGESIZE


class WeightsFileError(ValueError):
    """The file is not a readable safetensors file; the message names it and what is wrong."""


class WeightsFile:
    """`with WeightsFile(path) as f:` f.names(), f.shape(name), f.tensor(name) (a view of the mapping),
    f.release(name) (its pages back to the kernel once copied)."""

    def __init__(self, path: str):
        if sys.byteorder != "little":
            raise WeightsFileError("safetensors files are little-endian; this machine is not")
        self.path = path
        self._file = open(path, "rb")
        try:
            size = os.fstat(self._file.fileno()).st_size
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else None
            self._header, self._base = _read_header(path, self._map, size)
        except BaseException:
            self.close()
            raise

    def names(self) -> list[str]:
        return list(self._header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._header[name]["shape"])

    def dtype(self, name: str) -> torch.dtype | None:
        """The tensor's torch dtype (None: one param2moe does not read)."""
        return DTYPES.get(self._header[name]["dtype"])

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor as a read-only view of the mapped file (do not write to it)."""
        info = self._header[name]
        dtype, shape = DTYPES.get(info["dtype"]), tuple(info["shape"])
        if dtype is None:
            raise WeightsFileError(f"tensor {name!r} in {os.path.basename(self.path)} has dtype {info['dtype']}, "
                                   "which param2moe does not read")
        start, end = info["data_offsets"]
        count = (end - start) // dtype.itemsize
        if count * dtype.itemsize != end - start or count != _numel(shape):
            raise WeightsFileError(f"tensor {name!r} in {os.path.basename(self.path)}: {end - start} bytes of "
                                   f"{info['dtype']} for shape {list(shape)}")
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        with warnings.catch_warnings():  # the mapping is read-only, and never written through the view
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(self._map, dtype=dtype, count=count, offset=self._base + start)
        return flat.view(shape)

    def nbytes(self, name: str) -> int:
        start, end = self._header[name]["data_offsets"]
        return end - start

    def release(self, name: str) -> None:
        """Drop this process's pages of the tensor's bytes (the file stays in the page cache, which the kernel
        may reclaim): resident memory does not grow with the part of the file already loaded."""
        start, end = self._header[name]["data_offsets"]
        lo = -(-(self._base + start) // _PAGE) * _PAGE  # whole pages inside the tensor's bytes only
        hi = (self._base + end) // _PAGE * _PAGE
        if hi > lo and hasattr(self._map, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def close(self) -> None:
        if getattr(self, "_map", None) is not None:
            self._map.close()
            self._map = None
        self._file.close()

    def __enter__(self) -> WeightsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_header(path: str, mapped, size: int) -> tuple[dict, int]:
    where = os.path.basename(path)
    if size < 8:
        raise WeightsFileError(f"{where}: {size} bytes, too short for a safetensors file")
    (n,) = struct.unpack("<Q", mapped[:8])
    if 8 + n > size:
        raise WeightsFileError(f"{where}: its header claims {n} bytes, more than the file holds")
    try:
        header = json.loads(bytes(mapped[8:8 + n]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsFileError(f"{where}: the header is not valid JSON ({e})") from None
    header.pop("__metadata__", None)
    base = 8 + n
    for name, info in header.items():
        start, end = info.get("data_offsets", (0, -1))
        if not 0 <= start <= end <= size - base:
            raise WeightsFileError(f"{where}: tensor {name!r} lies outside the file")
    return header, base


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
