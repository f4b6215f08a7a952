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


# P2M_PDL=0: no programmatic dependent launch anywhere (A/B measurements; the GEMV then falls back to cuBLAS)
_PDL_ENABLED = os.environ.get("P2M_PDL", "1") != "0"


@functools.cache
def _pdl_supported(index) -> bool:
    return _PDL_ENABLED and not INTERPRET and torch.cuda.get_device_capability(index)[0] >= 9


def pdl_flag(t: torch.Tensor) -> bool:
    """Whether kernels on t's device may use programmatic dependent launch (Hopper and later; not the
    interpreter). Kernels take it as their PDL constexpr: see `release_dependents` and `gemv.py`."""
    return t.is_cuda and _pdl_supported(t.device.index)


@triton.jit
def release_dependents(PDL: tl.constexpr):
    """Let the next kernel in the stream be scheduled now, if it was launched to wait for us in-kernel
    (programmatic dependent launch, `pdl_launch`): its programs start, load their constants and wait while
    this kernel runs (the decode GEMV loads its weights; at one token the experts' gate/up streams the
    shared expert's while the router runs). Without such a dependent it does nothing."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def wait_for_previous(PDL: tl.constexpr):
    """Block until the kernel in front has finished and its writes are visible. A kernel launched with
    `pdl_launch` may start while the one in front still runs: before this call it may read constants
    (weights) only, and write nothing (its output may reuse memory that kernel still reads)."""
    if PDL:
        tl.extra.cuda.gdc_wait()


def pdl_launch(pdl: bool) -> dict:
    """The launch keywords of a kernel that waits for the one in front in-kernel (`wait_for_previous`)."""
    return {"launch_pdl": True} if pdl else {}
