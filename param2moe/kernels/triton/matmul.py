"""Skinny matmuls (decode: a few rows of activations against a large weight) in Triton.
Oracle: `param2moe.kernels.matmul.linear` (x @ w.T + bias, fp32 accumulation, one rounding).

At decode sizes these matmuls only stream the weight, and cuBLAS picks tiles for them that read
Param2's attention projections at about half the copy rate (benchmarks/results/h100_2026-11-26b/
profile_decode.txt). Here a program owns BLOCK_N output features and walks the whole K dimension, so
the grid has N / BLOCK_N programs, each streaming its rows of the weight once; the few activation
rows ride along. Two inner products: tensor cores (rows padded to BLOCK_M = 16), or for one row,
plain FMAs (DOT = False). Configs by row count come from benchmarks/gpu_linear.py; beyond the
largest tuned row count, `linear` returns None and the caller uses cuBLAS.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, mma


@triton.jit(do_not_specialize=["M"])
def _skinny_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                   HAS_BIAS: tl.constexpr, DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr, INTERP: tl.constexpr):
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = offs_m < M
    offs_nc = tl.where(offs_n < N, offs_n, 0)  # clamp: rows past N are read again and dropped
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_nc[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    if DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=mmask[:, None], other=0.0)
            w = tl.load(w_ptrs)
        else:
            kmask = offs_k < K - kb * BLOCK_K
            x = tl.load(x_ptrs, mask=mmask[:, None] & kmask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=kmask[None, :], other=0.0)
        if DOT:
            acc = mma(x, tl.trans(w), acc, IEEE, INTERP)
        else:  # BLOCK_M == 1
            acc += tl.sum(w.to(tl.float32) * x.to(tl.float32), axis=1)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_nc).to(tl.float32)
    nmask = offs_n < N
    if DOT:
        y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])
    else:
        tl.store(y_ptr + offs_m.to(tl.int64) * stride_ym + offs_n, acc.to(y_ptr.dtype.element_ty), mask=nmask)


def _cfg(dot, bn, bk, warps, stages):
    return {"DOT": dot, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps, "num_stages": stages}


# Largest row count -> config, measured on H100 by benchmarks/gpu_linear.py (results under
# benchmarks/results/); past the last entry cuBLAS is as fast or faster.
CONFIGS: list[tuple[int, dict]] = [
    (1, _cfg(False, 16, 256, 4, 4)),
    (8, _cfg(True, 32, 128, 4, 4)),
]


def config_for(m: int) -> dict | None:
    return next((c for most, c in CONFIGS if m <= most), None)


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, config: dict | None = None):
    """x [M, K] @ w[N, K].T (+ bias) with fp32 accumulation, in x's dtype; None when M is past the
    tuned row counts (or the layout does not suit), so that the caller runs cuBLAS."""
    cfg = config or config_for(x.shape[0])
    if cfg is None or x.dim() != 2 or w.stride(-1) != 1 or x.dtype != w.dtype:
        return None
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    dot = cfg["DOT"] or m > 1
    block_m = 16 if dot else 1
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(m, block_m))
    _skinny_kernel[grid](
        x, w, bias if bias is not None else w, y, m, n, k, x.stride(0), w.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, DOT=dot, BLOCK_M=block_m, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        EVEN_K=k % cfg["BLOCK_K"] == 0, IEEE=x.dtype == torch.float32, INTERP=INTERPRET,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y
