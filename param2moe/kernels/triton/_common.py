"""Helpers shared by the Triton kernels."""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# Triton's CPU interpreter (TRITON_INTERPRET=1, the tests without a GPU) multiplies bf16 tiles in tl.dot
# wrongly (3.6: garbage), so under it the operands are upcast to fp32 first. Compiled kernels never do.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def mma(a, b, acc, IEEE: tl.constexpr, INTERP: tl.constexpr):
    """acc + a @ b: fp32 operands exactly (IEEE) rather than through tf32; bf16 on the tensor cores."""
    if INTERP:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@functools.cache
def _pdl_supported(index) -> bool:
    return not INTERPRET and torch.cuda.get_device_capability(index)[0] >= 9


def pdl_flag(t: torch.Tensor) -> bool:
    """Whether kernels on t's device may use programmatic dependent launch (Hopper and later; not the
    interpreter). Kernels take it as their PDL constexpr: see `release_dependents` and `gemv.py`."""
    return t.is_cuda and _pdl_supported(t.device.index)


@triton.jit
def release_dependents(PDL: tl.constexpr):
    """Let the next kernel in the stream be scheduled now, if it was launched to wait for us in-kernel
    (programmatic dependent launch): the decode GEMV then loads its weights while this kernel runs. Called
    first thing; without such a dependent it does nothing."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
