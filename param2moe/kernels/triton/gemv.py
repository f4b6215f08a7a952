"""Decode-sized linear layers (a few tokens, bf16/fp16 weights) in Triton, overlapped with the kernel
before them. Oracle: `param2moe.kernels.matmul.linear` (F.linear).

At batch 1 a projection such as attention's qkv (12.6 MB for Param2) takes cuBLAS ~6.4 us, about twice
its bytes over the copy bandwidth: most of it is the ramp before the loads stream. Here each program
holds BLOCK_N whole weight rows in registers, loaded BEFORE it waits for the kernel in front of it
(programmatic dependent launch: the launch lets our programs start while that kernel still runs, and
`gdc_wait` blocks until it has finished and its writes are visible); only the activations are read after.
The kernels in front release their dependents first thing (`_common.release_dependents`), so the
weights stream in while they run. Weights are constants: reading them early is safe.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._common import pdl_flag, pdl_launch, wait_for_previous

# Each token is one more pass over the registers: measured on an H100 (Param2 qkv/dense, same call) 3 us
# faster than cuBLAS per projection at 1 token, 3 us slower at 8; about even at 4.
MAX_TOKENS = 4  # beyond: cuBLAS
MAX_WEIGHT_BYTES = 32 << 20  # weights all resident in registers across the GPU's programs at once
_ENABLED = os.environ.get("P2M_GEMV", "1") != "0"  # P2M_GEMV=0: cuBLAS always (A/B measurements)


@triton.jit(do_not_specialize=["T"])
def _gemv_kernel(x_ptr, w_ptr, out_ptr, T, N, stride_xt, stride_wn, stride_ot, K: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, BLOCK_K)
    nmask, kmask = n < N, k < K
    w = tl.load(w_ptr + n[:, None].to(tl.int64) * stride_wn + k[None, :], mask=nmask[:, None] & kmask[None, :],
                other=0.0)
    wait_for_previous(PDL)
    for t in range(0, T):
        x = tl.load(x_ptr + t * stride_xt + k, mask=kmask, other=0.0).to(tl.float32)
        acc = tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        tl.store(out_ptr + t * stride_ot + n, acc.to(out_ptr.dtype.element_ty), mask=nmask)


def usable(x: torch.Tensor, weight: torch.Tensor, bias) -> bool:
    """Whether `gemv` serves this linear: it `fits`, on a GPU with programmatic dependent launch (without
    it nothing overlaps, and cuBLAS is as fast: benchmarks/results/gpu_kernels_notes.md, skinny matmuls)."""
    return _ENABLED and pdl_flag(x) and fits(x, weight, bias)


def fits(x: torch.Tensor, weight: torch.Tensor, bias) -> bool:
    """Few tokens, a 16-bit weight small enough for the registers, no bias."""
    return (bias is None and x.dim() == 2 and 0 < x.shape[0] <= MAX_TOKENS
            and weight.dtype in (torch.bfloat16, torch.float16) and x.dtype == weight.dtype
            and weight.stride(-1) == 1 and weight.shape[1] <= 4096
            and weight.numel() * weight.element_size() <= MAX_WEIGHT_BYTES)


# A weight too large for the registers streams through programs of STREAM_BLOCK_N rows, all loads of a program
# in flight at once (the head: Param2's 524 MB, where cuBLAS reaches 2.86 TB/s on an H100).
STREAM_BLOCK_N = 4


def streams(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `gemv` serves this linear as a stream (the head): few tokens, a large 16-bit weight."""
    return (_ENABLED and x.is_cuda and x.dim() == 2 and 0 < x.shape[0] <= MAX_TOKENS and x.dtype == weight.dtype
            and weight.dtype in (torch.bfloat16, torch.float16) and weight.stride(-1) == 1
            and weight.shape[1] <= 4096 and weight.numel() * weight.element_size() > MAX_WEIGHT_BYTES)


def gemv(x: torch.Tensor, weight: torch.Tensor, out_dtype=None, block_n: int | None = None) -> torch.Tensor:
    """x [T, K] @ weight[N, K].T in fp32, rounded to out_dtype (default x's dtype) (T <= MAX_TOKENS; see
    `usable`, `streams`)."""
    t, k = x.shape
    n = weight.shape[0]
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(t, n, dtype=out_dtype or x.dtype, device=x.device)
    block_k = triton.next_power_of_2(k)
    # 16K weight elements a program (4 warps: 164 registers a thread on sm_90, three programs an SM): the
    # programs of a whole Param2 projection fit on an H100 at once (8 warps fit two: measured slower)
    block_n = block_n or max(1, min(16, 16384 // block_k))
    pdl = pdl_flag(x)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, out, t, n, x.stride(0), weight.stride(0), out.stride(0), K=k, BLOCK_N=block_n,
        BLOCK_K=block_k, PDL=pdl, num_warps=4, **pdl_launch(pdl))
    return out
