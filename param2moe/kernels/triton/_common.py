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
    if INTERPRET or os.environ.get("P2M_PDL", "1") == "0":
        return False
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl(t: torch.Tensor) -> dict:
    """Launch options for programmatic dependent launch (Hopper and later; P2M_PDL=0 turns it off): the
    kernel's programs may be scheduled while the kernel before it in the stream still runs, and wait in
    `pdl_start` until it has finished and its writes are visible, so each launch's ramp-up overlaps the
    previous kernel's tail. Kernels launched with these options must call `pdl_start` first."""
    on = t.is_cuda and _pdl_supported(t.device.index)
    return {"USE_PDL": True, "launch_pdl": True} if on else {"USE_PDL": False}


@triton.jit
def pdl_start(USE_PDL: tl.constexpr):
    """First thing in a kernel: wait for the previous kernel (before any load or store: its outputs are our
    inputs, and memory it still reads may be ours to write), then let the next one be scheduled."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
