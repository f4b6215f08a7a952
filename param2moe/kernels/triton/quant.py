"""Linear layers and the fused MoE with quantized weights (int8, int4, fp8: `param2moe/quant/formats.py`) in
Triton, the weights dequantized in registers. Oracle: F.linear and `param2moe.kernels.moe.moe_experts` on
`dequantize(qw)`.

    usable(x, qw) -> bool
    linear(x [T, K], qw [N, K], bias=None, *, out_dtype=None, act=None) -> [T, N]
    moe_experts(x [T, H], w13 [E, 2I, H], w2 [E, H, I], weights [T, k], ids [T, k], *, unsummed=False,
                num_appended=0, act=None) -> [T, H]

Decode is bound by the bytes of the weights, so the kernels read the stored bytes and convert them in
registers, accumulating in fp32; the scale multiplies a sum (a row's, or a group's / block's partial sum),
never each weight. Two kernels, the two shapes of the bf16 ones (gemv.py, moe.py):
- `_qgemv_kernel`, matrix-vector: each program loads BLOCK_N whole weight rows, every load in flight at
  once, and reduces them against each token's row. It serves linear layers at a few tokens (with PDL: the
  rows are loaded before waiting for the kernel in front, as gemv.py does) and, at one token, the MoE's
  experts (gate/up with SiLU-and-mul, then down; an expert per column of ids, as moe.py's ONE_TOKEN path).
  int8 / int4 rows are read as int32 words. int4 (by default) quantizes x to int8 per weight group in the
  kernel and multiplies four values an instruction in integers (`_x_int8`, `_int4_dots_int8`: dp4a); int8
  (and int4 with x in bf16) masks each value in place and reads it as a subnormal float (`_word_value`), not
  converted (int-to-float is a quarter-rate instruction on Hopper: at 3 TB/s of int4 an SM must make ~26
  values a clock).
- `_qmm_kernel`, tiled tensor-core GEMM: weight tiles converted to the activation dtype (int8, int4 and fp8
  values are exact in bf16) and multiplied by the scales in fp32 after the MMA (per K step for group / block
  scales). Linear layers at more tokens, and the fused MoE's two GEMMs on moe.py's expert-aligned slots
  (`moe_align`, `combine`, the tuned block sizes of moe_configs.py).
act="fp8" (fp8 weights; the default from FP8_ACT_TOKENS tokens, `activation_mode`): activations quantized per
token (`act_quant`), the tiles on the fp8 tensor cores. Every launch shape is a function of T alone and nothing
syncs with the host: CUDA-graph capturable.
docs/quant-kernels.md has the design and the knobs.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ...quant.formats import FP8_BLOCK, QuantizedWeight
from ._common import INTERPRET, mma, pdl_flag, pdl_launch, wait_for_previous
from .moe import _silu_mul, _tile_ids, combine, moe_align
from .moe_configs import get_config
from .norm import normed_chunk, row_rstd

# method codes (constexpr METHOD of the kernels)
INT8, INT4, FP8, FP8_BLOCK_SCALED = 0, 1, 2, 3
_WORD_VALUES = {INT8: 4, INT4: 8}  # values per int32 word as the GEMV reads them

# Tokens up to which `linear` runs the matrix-vector kernel (each token converts the weights again; beyond,
# the tiled GEMM converts each tile once for BLOCK_M tokens). P2M_QUANT_GEMV_TOKENS overrides (A/B runs).
GEMV_MAX_TOKENS = {INT8: 4, INT4: 4, FP8: 4, FP8_BLOCK_SCALED: 4}
_GEMV_OVERRIDE = os.environ.get("P2M_QUANT_GEMV_TOKENS")
GEMV_CHUNK = 4096  # logical columns a GEMV program holds at once (larger K: a loop of chunks, no preload)
# int4's x in the GEMV (XSPLIT): read by value position (0), in one load split in registers (X_SPLIT), or quantized
# to int8 per weight group in the kernel and multiplied 4 values an instruction (X_INT8: dp4a; the activations
# as the CPU kernels and llama.cpp quantize them, `x_int8_reference`).
X_SPLIT, X_INT8 = tl.constexpr(1), tl.constexpr(2)
# A GEMV program: (stored bytes it loads per weight set, warps, chunk columns, pipeline stages[, xsplit]); see
# `_gemv_shape`. Chunks of 1,024 columns through a 3-stage shared-memory pipeline keep enough bytes in flight
# (on an H100, 2026-12-06: the int4 MoE at one token 2.1x the unpipelined shape, fp8 1.26x; the variant sweeps of
# benchmarks/quant_gpu_bench.py, docs/quant-kernels.md), and int4 takes x in int8: its GEMV is bound by instruction
# issue, and dp4a cuts its loop by a third. The unpipelined shapes are variant "gemv_plain", int4's x in bf16
# "gemv_a16".
_PIPE_SHAPE = (4096, 4, 1024, 3)
GEMV_CONFIGS = {m: {use: (*_PIPE_SHAPE, X_INT8 if m == INT4 else 0) for use in ("linear", "gate_up", "down")}
                for m in (INT8, INT4, FP8, FP8_BLOCK_SCALED)}
# int4's MoE at one token: 16 rows a program share x's quantization (the step 2% shorter than at 8 rows)
GEMV_CONFIGS[INT4].update(gate_up=(8192, 4, 1024, 3, X_INT8), down=(8192, 4, 1024, 3, X_INT8))
# A linear layer at a few tokens whose weight fits the GPU's programs at once (attention's qkv and output
# projection) is instead one chunk a program, loaded BEFORE the wait for the kernel in front (PDL, as gemv.py's
# bf16 GEMV): its bytes stream in while that kernel runs. The pipelined shape loads after the wait (on an H100 a
# Param2 fp8 qkv added 4.3 us to a batch-1 step where the preloaded bf16 one added 1.8). Variant "linear_pipe".
GEMV_PRELOAD = {INT8: (16384, 8), INT4: (8192, 8, 0, 0, X_INT8), FP8: (16384, 4), FP8_BLOCK_SCALED: (16384, 4)}
PRELOAD_MAX_BYTES = 32 << 20
# fp8 weights: from this many tokens the activations are quantized to fp8 per token (dynamic, as vLLM's fp8) and
# the tiled GEMMs multiply on the fp8 tensor cores (the MoE 1.45x weight-only at 256 tokens on an H100); below
# it the GEMVs and tiles read the bf16 activations (weight-only: the weights' bytes bound the time, and the
# results stay closer to bf16). P2M_QUANT_FP8_ACT_TOKENS overrides (0: never).
FP8_ACT_TOKENS = int(os.environ.get("P2M_QUANT_FP8_ACT_TOKENS", "64"))
MMA_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def method_code(qw: QuantizedWeight) -> int:
    if qw.method == "fp8":
        return FP8_BLOCK_SCALED if qw.block else FP8
    return {"int8": INT8, "int4": INT4}[qw.method]


# ------------------------------------------------------------------------------ dequantization in registers
# The GEMV's int8 / int4 values: stored value u (int8: q + 128, the sign bit flipped; int4: q + 8) of an int32
# word, masked in place and read as the bits of an fp32: a subnormal, u * 2^(b - 149) for the value's bit
# offset b (< 23 once the upper half-word is shifted down). One integer op a value (and one shift a word),
# no int-to-float conversion (a quarter-rate instruction on Hopper; at 3 TB/s of int4 an SM meets ~26
# values a clock), no subtraction: x is multiplied by 2^(149 - b - 60) beforehand (exact: a power of two),
# so each product is u * x * 2^-60 (FFMA keeps subnormal inputs: Triton does not flush them), and the
# offset comes off the sum: sum(q x) = 2^60 * sum(u x 2^-60) - offset * sum(x). Products stay normal
# for |x| > 2^-66 and x overflows for |x| > 2^39 only.
_UNIT = tl.constexpr(2.0**60)
_X_BASE = tl.constexpr(2.0**89)  # 2^(149 - 60)


@triton.jit
def _word_value(w, S: tl.constexpr, METHOD: tl.constexpr, EPW: tl.constexpr):
    """Value S of each int32 word w (int8: 4 a word, int4: 8, low bits first), stored value u, as the fp32
    u * 2^(b - 149), b = 8 * (S % 2) (int8) or 4 * (S % 4) (int4)."""
    if S >= EPW // 2:
        w = w >> 16
    if METHOD == 0:
        return ((w & (0xFF << (8 * (S % 2)))) ^ (0x80 << (8 * (S % 2)))).to(tl.float32, bitcast=True)
    else:
        return (w & (0xF << (4 * (S % 4)))).to(tl.float32, bitcast=True)


@triton.jit
def _x_factor(S: tl.constexpr, METHOD: tl.constexpr):
    """2^(149 - 60 - b) for value S's bit offset b (see `_word_value`)."""
    if METHOD == 0:
        return _X_BASE / (1 << (8 * (S % 2)))
    else:
        return _X_BASE / (1 << (4 * (S % 4)))


@triton.jit
def _load_rows(w_ptr, row_off, nmask, k0, K: tl.constexpr, EPW: tl.constexpr, BLOCK_K: tl.constexpr):
    """The stored elements of weight rows row_off (offsets in w_ptr's elements) for logical columns
    k0 .. k0 + BLOCK_K: [BLOCK_N, BLOCK_K // EPW] (int32 words for int8 / int4, fp8 values for fp8)."""
    j = tl.arange(0, BLOCK_K // EPW)
    col = k0 // EPW + j
    m = nmask[:, None] & (col < K // EPW)[None, :]
    if EPW == 1:  # fp8
        return tl.load(w_ptr + row_off[:, None] + col[None, :], mask=m, other=0.0)
    else:
        return tl.load(w_ptr + row_off[:, None] + col[None, :], mask=m, other=0)


@triton.jit
def _nibble_products(p, raw, x, S: tl.constexpr):
    return p + _word_value(raw, S, 1, 8) * (x * _x_factor(S, 1))[None, :]


@triton.jit
def _int4_products_xsplit(raw, x, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """`_row_dots`' int4 products (p, xsum) with x (fp32 [BLOCK_K], read in one contiguous load: 16-byte loads,
    8 values a word) split in registers by nibble position, instead of 8 strided loads of 2 bytes (one a value)."""
    x = tl.reshape(x, (BLOCK_K // 8, 2, 2, 2))
    c0, c1 = tl.split(x)  # x[8 j + 4 a + 2 b + c]: split c, then b, then a
    c0b0, c0b1 = tl.split(c0)
    c1b0, c1b1 = tl.split(c1)
    x0, x4 = tl.split(c0b0)
    x2, x6 = tl.split(c0b1)
    x1, x5 = tl.split(c1b0)
    x3, x7 = tl.split(c1b1)
    p = tl.zeros((BLOCK_N, BLOCK_K // 8), dtype=tl.float32)
    p = _nibble_products(p, raw, x0, 0)
    p = _nibble_products(p, raw, x1, 1)
    p = _nibble_products(p, raw, x2, 2)
    p = _nibble_products(p, raw, x3, 3)
    p = _nibble_products(p, raw, x4, 4)
    p = _nibble_products(p, raw, x5, 5)
    p = _nibble_products(p, raw, x6, 6)
    p = _nibble_products(p, raw, x7, 7)
    return p, ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))


_ROUND = tl.constexpr(12582912.0)  # 1.5 * 2^23: y + _ROUND holds round-to-even(y) in its low bits (|y| < 2^22)
_ROUND_BITS = tl.constexpr(0x4B400000)  # the bits of _ROUND
_INTERP = tl.constexpr(INTERPRET)


@triton.jit
def _x_int8(x, BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
    """x (fp32 [BLOCK_K]) as int8 per GROUP values, q = round-to-even(x * (127 / max|x|)) (the oracle:
    `x_int8_reference`), packed for `_int4_dots_int8`: per weight word j the int32s of bytes (q[8j], q[8j+2],
    q[8j+4], q[8j+6]) and (q[8j+1], .., q[8j+7]) (the word's even and odd nibbles); with each group's scale
    max|x| / 127 and its sum of q."""
    G: tl.constexpr = BLOCK_K // GROUP
    xg = tl.reshape(x, (G, GROUP))
    amax = tl.max(tl.abs(xg), axis=1)
    inv = 127.0 / tl.maximum(amax, 1e-30)  # a group of zeros: any finite inv
    bits = (xg * inv[:, None] + _ROUND).to(tl.int32, bitcast=True)
    qsum = tl.sum(bits - _ROUND_BITS, axis=1)
    even, odd = tl.split(tl.reshape(bits & 0xFF, (BLOCK_K // 8, 4, 2)))
    shift = 8 * tl.arange(0, 4)
    lo = tl.sum(even << shift[None, :], axis=1)
    hi = tl.sum(odd << shift[None, :], axis=1)
    return lo, hi, amax / 127.0, qsum


@triton.jit
def _dp4a(a, b, c):
    """c + the dot product of a's four bytes (unsigned) and b's (signed), int32s elementwise."""
    if _INTERP:
        for i in tl.static_range(4):
            c += ((a >> (8 * i)) & 0xFF) * ((b << (24 - 8 * i)) >> 24)
        return c
    else:
        return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32,
                                         is_pure=True, pack=1)


@triton.jit
def _int4_dots_int8(raw, xq, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
    """[BLOCK_N, BLOCK_K // GROUP] fp32: each row's sum over a group of (u - 8) * q * x's scale, the int4 words
    raw (stored u = q + 8) against `_x_int8`'s xq, in integers (exact) until the scale."""
    lo, hi, sx, qsum = xq
    d = _dp4a(raw & 0x0F0F0F0F, lo[None, :], tl.zeros((BLOCK_N, BLOCK_K // 8), dtype=tl.int32))
    d = _dp4a((raw >> 4) & 0x0F0F0F0F, hi[None, :], d)
    dg = tl.sum(tl.reshape(d, (BLOCK_N, BLOCK_K // GROUP, GROUP // 8)), axis=2)
    return (dg - 8 * qsum[None, :]).to(tl.float32) * sx[None, :]


@triton.jit
def _x_operand(xr, k0, K: tl.constexpr, r_ptr, nw_ptr, rstd, METHOD: tl.constexpr, GROUP: tl.constexpr,
               BLOCK_K: tl.constexpr, XSPLIT: tl.constexpr, NORM: tl.constexpr):
    """What `_row_dots` takes as xv for x[k0 : k0 + BLOCK_K]: the fp32 chunk (fp8, XSPLIT), `_x_int8`'s
    (XSPLIT == X_INT8), or nothing (the others read x themselves)."""
    if XSPLIT == X_INT8:
        xv = _x_int8(_x_chunk(xr, k0, K, r_ptr, nw_ptr, rstd, BLOCK_K, NORM), BLOCK_K, GROUP)
    elif METHOD >= 2 or XSPLIT > 0:
        xv = _x_chunk(xr, k0, K, r_ptr, nw_ptr, rstd, BLOCK_K, NORM)
    else:
        xv = 0.0
    return xv


@triton.jit
def _x_chunk(xr, k0, K: tl.constexpr, r_ptr, nw_ptr, rstd, BLOCK_K: tl.constexpr, NORM: tl.constexpr):
    """x[k0 : k0 + BLOCK_K] in fp32 (0 past K). NORM: x = rms_norm(h + r) * nw computed here from xr = h
    (norm.normed_chunk; rstd from norm.row_rstd)."""
    k = k0 + tl.arange(0, BLOCK_K)
    if NORM:
        return normed_chunk(xr, r_ptr, nw_ptr, k, k < K, rstd).to(tl.float32)
    return tl.load(xr + k, mask=k < K, other=0.0).to(tl.float32)


@triton.jit
def _products(raw, x_ptr, xv, k0, K: tl.constexpr, METHOD: tl.constexpr, EPW: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, XSPLIT: tl.constexpr):
    """(p, xsum): each stored element's product with its x ([BLOCK_N, BLOCK_K // EPW] fp32; int words: the sum
    over the word's values, the scaled subnormals of `_word_value`) and x's sum a word (int; fp8: zeros)."""
    j = tl.arange(0, BLOCK_K // EPW)
    if METHOD >= 2:  # fp8
        p = raw.to(tl.float32) * xv[None, :]
        xsum = tl.zeros((BLOCK_K // EPW,), dtype=tl.float32)
    elif METHOD == 1 and XSPLIT == X_SPLIT:
        p, xsum = _int4_products_xsplit(raw, xv, BLOCK_N, BLOCK_K)
    else:
        p = tl.zeros((BLOCK_N, BLOCK_K // EPW), dtype=tl.float32)
        xsum = tl.zeros((BLOCK_K // EPW,), dtype=tl.float32)
        for s in tl.static_range(EPW):
            xk = k0 + j * EPW + s
            x = tl.load(x_ptr + xk, mask=xk < K, other=0.0).to(tl.float32)
            xsum += x
            p += _word_value(raw, s, METHOD, EPW) * (x * _x_factor(s, METHOD))[None, :]
    return p, xsum


@triton.jit
def _row_dots(raw, s_ptr, s_off, nmask, x_ptr, xv, k0, K: tl.constexpr, METHOD: tl.constexpr, EPW: tl.constexpr,
              GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, XSPLIT: tl.constexpr = 0):
    """[BLOCK_N] fp32: each row's dequantized weights (raw, from `_load_rows`) dot x[k0 : k0 + BLOCK_K]: fp8 and
    XSPLIT (int4) take x as xv (`_x_operand`: the chunk, split in registers by `_int4_products_xsplit`, or
    quantized to int8 for `_int4_dots_int8`), the others read it from x_ptr by a word's value position.
    s_off: each row's offset of its scale row (per channel: the scale itself)."""
    if METHOD == 0:  # int8: one scale a row, stored value q + 128
        p, xsum = _products(raw, x_ptr, xv, k0, K, METHOD, EPW, BLOCK_N, BLOCK_K, XSPLIT)
        return (tl.sum(p, axis=1) * _UNIT - 128.0 * tl.sum(xsum, axis=0)) * tl.load(s_ptr + s_off, mask=nmask,
                                                                                     other=0.0)
    elif METHOD == 2:  # fp8, one scale a row
        p, xsum = _products(raw, x_ptr, xv, k0, K, METHOD, EPW, BLOCK_N, BLOCK_K, XSPLIT)
        return tl.sum(p, axis=1) * tl.load(s_ptr + s_off, mask=nmask, other=0.0)
    else:  # a scale per GROUP columns of a row (int4, stored q + 8) or per 128x128 block (fp8)
        G: tl.constexpr = BLOCK_K // GROUP
        if METHOD == 1 and XSPLIT == X_INT8:
            pg = _int4_dots_int8(raw, xv, BLOCK_N, BLOCK_K, GROUP)
        else:
            p, xsum = _products(raw, x_ptr, xv, k0, K, METHOD, EPW, BLOCK_N, BLOCK_K, XSPLIT)
            pg = tl.sum(tl.reshape(p, (BLOCK_N, G, GROUP // EPW)), axis=2)
            if METHOD == 1:
                pg = pg * _UNIT - 8.0 * tl.sum(tl.reshape(xsum, (G, GROUP // EPW)), axis=1)[None, :]
        g = k0 // GROUP + tl.arange(0, G)
        sc = tl.load(s_ptr + s_off[:, None] + g[None, :], mask=nmask[:, None] & (g < tl.cdiv(K, GROUP))[None, :],
                     other=0.0)
        return tl.sum(pg * sc, axis=1)


# ------------------------------------------------------------------------------ matrix-vector kernel
@triton.jit
def _gemv_out(acc, acc_u, xs_ptr, bias_ptr, out_ptr, o_off, n, nmask, xs_idx, GATED: tl.constexpr,
              HAS_BIAS: tl.constexpr, X_SCALE: tl.constexpr):
    """Store a token's row sums: times x's scale (fp8 activations), silu(gate) * up or + bias, rounded."""
    dt = out_ptr.dtype.element_ty
    if X_SCALE > 0:
        xs = tl.load(xs_ptr + xs_idx)
        acc = acc * xs
        acc_u = acc_u * xs
    if GATED:
        y = _silu_mul(acc, acc_u, dt)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + n, mask=nmask, other=0.0).to(tl.float32)
        y = acc.to(dt)
    tl.store(out_ptr + o_off + n, y, mask=nmask)


@triton.jit
def _chunk_dots(acc, acc_u, c, w_ptr, s_ptr, xr, r_ptr, nw_ptr, rstd, g_row, u_row, g_srow, u_srow, nmask,
                K: tl.constexpr, METHOD: tl.constexpr, EPW: tl.constexpr, GROUP: tl.constexpr, GATED: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, XSPLIT: tl.constexpr, NORM: tl.constexpr):
    """acc (gate rows) and acc_u (up rows, when GATED) plus chunk c's products."""
    k0 = c * BLOCK_K
    xv = _x_operand(xr, k0, K, r_ptr, nw_ptr, rstd, METHOD, GROUP, BLOCK_K, XSPLIT, NORM)
    gc = _load_rows(w_ptr, g_row, nmask, k0, K, EPW, BLOCK_K)
    acc += _row_dots(gc, s_ptr, g_srow, nmask, xr, xv, k0, K, METHOD, EPW, GROUP, BLOCK_N, BLOCK_K, XSPLIT)
    if GATED:
        uc = _load_rows(w_ptr, u_row, nmask, k0, K, EPW, BLOCK_K)
        acc_u += _row_dots(uc, s_ptr, u_srow, nmask, xr, xv, k0, K, METHOD, EPW, GROUP, BLOCK_N, BLOCK_K, XSPLIT)
    return acc, acc_u


@triton.jit
def _gemv_rows(x_ptr, xs_ptr, w_ptr, s_ptr, out_ptr, bias_ptr, r_ptr, nw_ptr, eps, col, e, nb, T, N, stride_xc,
               stride_xt, stride_we, stride_wn, stride_se, stride_sn, stride_oc, stride_ot, K: tl.constexpr,
               METHOD: tl.constexpr, EPW: tl.constexpr, GROUP: tl.constexpr, SROWS: tl.constexpr,
               GATED: tl.constexpr, HAS_BIAS: tl.constexpr, X_SCALE: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, PRELOAD: tl.constexpr, PDL: tl.constexpr, PIPE: tl.constexpr,
               XSPLIT: tl.constexpr, NORM: tl.constexpr = False):
    """Rows nb * BLOCK_N.. of expert e against x rows col * stride_xc + t * stride_xt, t < T, into out rows
    col * stride_oc + t * stride_ot. GATED: the rows n and N + n (gate, up), silu(gate) * up stored.
    X_SCALE: x is fp8 with a scale per token (1) or per column (2). PRELOAD: the weights are loaded before
    waiting for the kernel in front (one chunk only). PIPE > 0 (several chunks): the chunk loop is a
    software pipeline of PIPE stages (Triton's tl.range: the weight loads of the next chunks in flight
    through shared memory while this one is reduced; bytes in flight no longer cost registers). XSPLIT: see
    `_row_dots`. NORM (one token, fp8 or XSPLIT): x is rms_norm(x + r) * nw (eps), computed here (`_x_chunk`)."""
    tl.static_assert(not NORM or METHOD >= 2 or XSPLIT > 0, "NORM: x read in contiguous chunks only")
    n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    g_row = e * stride_we + n.to(tl.int64) * stride_wn
    g_srow = e * stride_se + (n // SROWS).to(tl.int64) * stride_sn
    u_row = g_row + N * stride_wn
    u_srow = e * stride_se + ((N + n) // SROWS).to(tl.int64) * stride_sn
    CHUNKS: tl.constexpr = (K + BLOCK_K - 1) // BLOCK_K
    if CHUNKS == 1:
        g = _load_rows(w_ptr, g_row, nmask, 0, K, EPW, BLOCK_K)
        if GATED:
            u = _load_rows(w_ptr, u_row, nmask, 0, K, EPW, BLOCK_K)
    if PRELOAD:
        wait_for_previous(PDL)
    rstd = row_rstd(x_ptr, r_ptr, K, eps, BLOCK_K) if NORM else 0.0
    for t in range(0, T):
        xr = x_ptr + col * stride_xc + t * stride_xt
        if CHUNKS == 1:
            xv = _x_operand(xr, 0, K, r_ptr, nw_ptr, rstd, METHOD, GROUP, BLOCK_K, XSPLIT, NORM)
            acc = _row_dots(g, s_ptr, g_srow, nmask, xr, xv, 0, K, METHOD, EPW, GROUP, BLOCK_N, BLOCK_K, XSPLIT)
            acc_u = acc
            if GATED:
                acc_u = _row_dots(u, s_ptr, u_srow, nmask, xr, xv, 0, K, METHOD, EPW, GROUP, BLOCK_N, BLOCK_K,
                                  XSPLIT)
        elif PIPE > 0:
            acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
            acc_u = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for c in tl.range(0, CHUNKS, num_stages=PIPE):
                acc, acc_u = _chunk_dots(acc, acc_u, c, w_ptr, s_ptr, xr, r_ptr, nw_ptr, rstd, g_row, u_row, g_srow,
                                         u_srow, nmask, K, METHOD, EPW, GROUP, GATED, BLOCK_N, BLOCK_K, XSPLIT, NORM)
        else:  # rows too long for the registers: chunk by chunk, loaded after the wait
            acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
            acc_u = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for c in tl.static_range(CHUNKS):
                acc, acc_u = _chunk_dots(acc, acc_u, c, w_ptr, s_ptr, xr, r_ptr, nw_ptr, rstd, g_row, u_row, g_srow,
                                         u_srow, nmask, K, METHOD, EPW, GROUP, GATED, BLOCK_N, BLOCK_K, XSPLIT, NORM)
        _gemv_out(acc, acc_u, xs_ptr, bias_ptr, out_ptr, col * stride_oc + t * stride_ot, n, nmask,
                  col if X_SCALE == 2 else t, GATED, HAS_BIAS, X_SCALE)


@triton.jit(do_not_specialize=["T", "col_pre", "e_pre"])
def _qgemv_kernel(x_ptr, xs_ptr, w_ptr, s_ptr, out_ptr, bias_ptr, ids_ptr, h_ptr, r_ptr, nw_ptr, eps, T, N, col_pre,
                  e_pre, stride_xc, stride_xt, stride_we, stride_wn, stride_se, stride_sn, stride_oc, stride_ot,
                  K: tl.constexpr, METHOD: tl.constexpr, EPW: tl.constexpr, GROUP: tl.constexpr, SROWS: tl.constexpr,
                  GATED: tl.constexpr, HAS_IDS: tl.constexpr, PRE_COLS: tl.constexpr, HAS_BIAS: tl.constexpr,
                  X_SCALE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
                  PIPE: tl.constexpr, XSPLIT: tl.constexpr, PRE_NORM: tl.constexpr):
    """Without ids (a linear layer): one column, expert 0; every program loads its rows, then waits for the
    kernel in front. With ids (the MoE at one token): the first PRE_COLS * num_n programs serve columns
    col_pre.. (the folded shared expert: experts e_pre.., known without the router) and load before
    waiting as well; the others wait, read their column's expert from ids (-1: nothing to do), then load.
    PRE_NORM (launched behind the router, which releases it at its start: `gate_up_one_token`): the
    first programs need nothing from it: they norm the row themselves from h_ptr + r_ptr (nw_ptr, eps) and
    stream their weights while the router runs, and wait for it only before they end (so that the kernels
    after this one find it done); the others read the router's normed row x_ptr."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    pre = pid < PRE_COLS * num_n if HAS_IDS else pid >= 0
    if pre:
        blk = pid // num_n
        _gemv_rows(h_ptr if PRE_NORM else x_ptr, xs_ptr, w_ptr, s_ptr, out_ptr, bias_ptr, r_ptr, nw_ptr, eps,
                   col_pre + blk, (e_pre + blk).to(tl.int64), pid % num_n, T, N, stride_xc, stride_xt, stride_we,
                   stride_wn, stride_se, stride_sn, stride_oc, stride_ot, K, METHOD, EPW, GROUP, SROWS, GATED,
                   HAS_BIAS, X_SCALE, BLOCK_N, BLOCK_K, not PRE_NORM, PDL, PIPE, XSPLIT, PRE_NORM)
        if PRE_NORM:
            wait_for_previous(PDL)
    elif HAS_IDS:
        p = pid - PRE_COLS * num_n
        col = p // num_n
        wait_for_previous(PDL)
        e = tl.load(ids_ptr + col).to(tl.int64)
        if e >= 0:
            _gemv_rows(x_ptr, xs_ptr, w_ptr, s_ptr, out_ptr, bias_ptr, r_ptr, nw_ptr, eps, col, e, p % num_n, T, N,
                       stride_xc, stride_xt, stride_we, stride_wn, stride_se, stride_sn, stride_oc, stride_ot, K,
                       METHOD, EPW, GROUP, SROWS, GATED, HAS_BIAS, X_SCALE, BLOCK_N, BLOCK_K, False, PDL, PIPE, XSPLIT)


# ------------------------------------------------------------------------------ tiled tensor-core kernel
@triton.jit
def _int4_join_step(a_rows, amask, w_rows, s_cols, k0, Kdim, acc, GROUP: tl.constexpr, BLOCK_K: tl.constexpr,
                    EVEN_K: tl.constexpr, IEEE: tl.constexpr, INTERP: tl.constexpr):
    """The int4 step of MoeVariant.int4_join: x's columns loaded contiguously (16-byte loads, not the even and odd
    columns apart), each nibble pair joined back into K order in registers, the group scales applied to the
    weights (w = bf16(q * s), as `dequantize` rounds them) and one dot over BLOCK_K, which may span several
    groups (a [G, BN] scale tile, broadcast over each group's rows)."""
    cdt = a_rows.dtype.element_ty
    BN: tl.constexpr = w_rows.shape[1]
    G: tl.constexpr = BLOCK_K // GROUP if BLOCK_K > GROUP else 1
    k = k0 + tl.arange(0, BLOCK_K)
    j = tl.arange(0, BLOCK_K // 2)
    if EVEN_K:
        a = tl.load(a_rows + k[None, :], mask=amask, other=0.0)
        b = tl.load(w_rows + (k0 // 2 + j)[:, None])
    else:
        a = tl.load(a_rows + k[None, :], mask=amask & (k < Kdim)[None, :], other=0.0)
        b = tl.load(w_rows + (k0 // 2 + j)[:, None], mask=(2 * j + k0 < Kdim)[:, None], other=0x88)
    bi = b.to(tl.int32)
    lo = ((bi & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
    hi = ((bi & 0xF0) | 0x4B000000).to(tl.float32, bitcast=True) * 0.0625 - 524296.0
    if G == 1:
        sc = tl.load(s_cols + k0 // GROUP)  # [1, BN]
        lo = lo * sc
        hi = hi * sc
    else:
        g = k0 // GROUP + tl.arange(0, G)
        sc = tl.load(s_cols + g[:, None], mask=(g < tl.cdiv(Kdim, GROUP))[:, None], other=0.0)[:, None, :]
        lo = tl.reshape(tl.reshape(lo, (G, BLOCK_K // 2 // G, BN)) * sc, (BLOCK_K // 2, BN))
        hi = tl.reshape(tl.reshape(hi, (G, BLOCK_K // 2 // G, BN)) * sc, (BLOCK_K // 2, BN))
    w = tl.reshape(tl.permute(tl.join(lo.to(cdt), hi.to(cdt)), (0, 2, 1)), (BLOCK_K, BN))
    return mma(a, w, acc, IEEE, INTERP)


@triton.jit
def _qdot_step(a_rows, amask, w_rows, s_cols, k0, Kdim, acc, METHOD: tl.constexpr, GROUP: tl.constexpr,
               BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr, INTERP: tl.constexpr,
               JOIN: tl.constexpr = False):
    """acc + x[rows, k0 : k0 + BLOCK_K] @ W[k0 : k0 + BLOCK_K, cols]: a_rows [BM, 1] pointers to the rows of x,
    w_rows [1, BN] to the stored weight rows, s_cols [1, BN] to the columns' scale rows. Per-channel methods
    leave the scale to the caller; group / block scales multiply this step's product (BLOCK_K <= GROUP).
    JOIN (int4): `_int4_join_step`."""
    cdt = a_rows.dtype.element_ty
    if METHOD == 1 and JOIN:
        return _int4_join_step(a_rows, amask, w_rows, s_cols, k0, Kdim, acc, GROUP, BLOCK_K, EVEN_K, IEEE, INTERP)
    elif METHOD == 1:  # int4: the even columns (low nibbles) and the odd ones (high), two dots, no interleaving
        j = tl.arange(0, BLOCK_K // 2)
        kk = k0 + 2 * j
        if EVEN_K:
            a0 = tl.load(a_rows + kk[None, :], mask=amask, other=0.0)
            a1 = tl.load(a_rows + kk[None, :] + 1, mask=amask, other=0.0)
            b = tl.load(w_rows + (k0 // 2 + j)[:, None])
        else:
            km = kk < Kdim
            a0 = tl.load(a_rows + kk[None, :], mask=amask & km[None, :], other=0.0)
            a1 = tl.load(a_rows + kk[None, :] + 1, mask=amask & km[None, :], other=0.0)
            b = tl.load(w_rows + (k0 // 2 + j)[:, None], mask=km[:, None], other=0)
        bi = b.to(tl.int32)
        lo = ((bi & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0  # 2^23 + 8
        # the high nibble in place (2^23 + 16 v): scaled down and offset in one exact FMA
        hi = ((bi & 0xF0) | 0x4B000000).to(tl.float32, bitcast=True) * 0.0625 - 524296.0  # (2^23 + 128) / 16
        lo = lo.to(cdt)
        hi = hi.to(cdt)
        step = mma(a0, lo, tl.zeros(acc.shape, dtype=tl.float32), IEEE, INTERP)
        step = mma(a1, hi, step, IEEE, INTERP)
        return acc + step * tl.load(s_cols + k0 // GROUP)
    else:
        k = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            a = tl.load(a_rows + k[None, :], mask=amask, other=0.0)
            b = tl.load(w_rows + k[:, None])
        else:
            km = k < Kdim
            a = tl.load(a_rows + k[None, :], mask=amask & km[None, :], other=0.0)
            b = tl.load(w_rows + k[:, None], mask=km[:, None], other=0.0 if METHOD >= 2 else 0)
        if METHOD == 0:  # q + 128 in the mantissa of 2^23
            b = ((((b.to(tl.int32) & 0xFF) ^ 0x80) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0).to(cdt)
        else:
            b = b.to(cdt)
        if METHOD == 3:  # fp8, 128x128 block scales
            return acc + mma(a, b, tl.zeros(acc.shape, dtype=tl.float32), IEEE, INTERP) * tl.load(s_cols + k0 // GROUP)
        else:
            return mma(a, b, acc, IEEE, INTERP)


@triton.jit(do_not_specialize=["M", "TK", "num_m"])
def _qmm_kernel(a_ptr, as_ptr, w_ptr, s_ptr, out_ptr, bias_ptr, sorted_ptr, expert_ids_ptr, npost_ptr, M, TK, num_m,
                Kdim, N, stride_at, stride_we, stride_wn, stride_se, stride_sn, stride_ot,
                METHOD: tl.constexpr, GROUP: tl.constexpr, SROWS: tl.constexpr, TOPK: tl.constexpr,
                A_SCALED: tl.constexpr, ALIGNED: tl.constexpr, GATED: tl.constexpr, A_BY_TOKEN: tl.constexpr,
                OUT_BY_PAIR: tl.constexpr,
                HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr, INTERP: tl.constexpr,
                JOIN: tl.constexpr):
    """out = x @ dequant(W)^T by tiles. ALIGNED (the fused MoE, moe.py's slot layout): each BLOCK_M block of
    slots belongs to one expert; A_BY_TOKEN: a slot reads its token's row of x (gate/up), else the slot's
    own row (down); OUT_BY_PAIR: the result goes to the slot's (token, k) pair's row (down), else the
    slot's. Else a linear layer: rows are tokens, M of them. GATED: rows n and N + n of the weight (gate,
    up), silu(gate) * up stored. A_SCALED: x is fp8 with a scale per row (as_ptr, `act_quant`), multiplied
    on fp8 weights' tiles as they are (fp8 tensor-core MMA)."""
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = _tile_ids(tl.program_id(0), num_m, num_n, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if ALIGNED:
        if pid_m * BLOCK_M >= tl.load(npost_ptr):
            return
        e = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
        pair = tl.load(sorted_ptr + offs_m)
        valid = pair < TK
        arow = (pair // TOPK).to(tl.int64) if A_BY_TOKEN else offs_m.to(tl.int64)
        orow = pair.to(tl.int64) if OUT_BY_PAIR else offs_m.to(tl.int64)
    else:
        e = pid_m.to(tl.int64) * 0
        valid = offs_m < M
        arow = offs_m.to(tl.int64)
        orow = arow
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_nc = tl.where(offs_n < N, offs_n, 0)  # clamp: columns past N are computed and dropped
    a_rows = a_ptr + arow[:, None] * stride_at
    amask = valid[:, None]
    g_rows = w_ptr + e * stride_we + offs_nc[None, :].to(tl.int64) * stride_wn
    g_scale = s_ptr + e * stride_se + (offs_nc // SROWS)[None, :].to(tl.int64) * stride_sn
    u_rows = g_rows + N * stride_wn
    u_scale = s_ptr + e * stride_se + ((N + offs_nc) // SROWS)[None, :].to(tl.int64) * stride_sn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(Kdim, BLOCK_K)):
        acc_g = _qdot_step(a_rows, amask, g_rows, g_scale, kb * BLOCK_K, Kdim, acc_g, METHOD, GROUP, BLOCK_K, EVEN_K,
                           IEEE, INTERP, JOIN)
        if GATED:
            acc_u = _qdot_step(a_rows, amask, u_rows, u_scale, kb * BLOCK_K, Kdim, acc_u, METHOD, GROUP, BLOCK_K,
                               EVEN_K, IEEE, INTERP, JOIN)
    if METHOD == 0 or METHOD == 2:  # per-channel scales, once at the end
        acc_g = acc_g * tl.load(g_scale)
        if GATED:
            acc_u = acc_u * tl.load(u_scale)
    if A_SCALED:
        a_scale = tl.load(as_ptr + arow, mask=valid, other=0.0)[:, None]
        acc_g = acc_g * a_scale
        acc_u = acc_u * a_scale
    dt = out_ptr.dtype.element_ty
    if GATED:
        y = _silu_mul(acc_g, acc_u, dt)
    else:
        if HAS_BIAS:
            acc_g += tl.load(bias_ptr + offs_nc)[None, :].to(tl.float32)
        y = acc_g.to(dt)
    o_ptrs = out_ptr + orow[:, None] * stride_ot + offs_n[None, :]
    tl.store(o_ptrs, y, mask=valid[:, None] & (offs_n[None, :] < N))


@triton.jit
def _round_e4m3(v):
    """v (fp32, |v| <= 448) rounded to the nearest fp8 e4m3 value, ties to even, in fp32: Triton's interpreter
    truncates in its fp8 casts (and drops the carry into the exponent); compiled kernels convert in hardware."""
    e = tl.maximum(((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)  # subnormals: a step of 2^-9
    step = ((e + 124) << 23).to(tl.float32, bitcast=True)  # 2^(e - 3): 3 mantissa bits
    return ((v / step + 12582912.0) - 12582912.0) * step  # 1.5 * 2^23: round to an integer, ties to even


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, BLOCK_K: tl.constexpr, INTERP: tl.constexpr):
    """Row r of x: scale = max|x[r]| / 448 (1 for a zero row), q = x[r] / scale in fp8 e4m3 (round to nearest)."""
    r = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        v = tl.load(x_ptr + r * stride_x + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
    m = tl.max(amax, axis=0)
    scale = tl.where(m > 0, m / 448.0, 1.0)
    for k0 in range(0, K, BLOCK_K):
        v = tl.load(x_ptr + r * stride_x + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        q = tl.clamp(v / scale, -448.0, 448.0)
        if INTERP:
            q = _round_e4m3(q)
        tl.store(q_ptr + r * stride_q + k0 + offs, q.to(q_ptr.dtype.element_ty), mask=k0 + offs < K)
    tl.store(s_ptr + r, scale)


def act_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-row fp8 e4m3 quantization of activations x [M, K]: (q [M, K] float8_e4m3fn, scale [M] fp32),
    x ~= q * scale[:, None]. The weight-and-activation fp8 path (`linear` / `moe_experts` act="fp8")."""
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(m, dtype=torch.float32, device=x.device)
    if m:
        _act_quant_kernel[(m,)](x, q, scale, k, x.stride(0), q.stride(0),
                                BLOCK_K=min(2048, triton.next_power_of_2(k)), INTERP=INTERPRET, num_warps=4)
    return q, scale


# ------------------------------------------------------------------------------ host side
class _W(NamedTuple):
    """How a kernel reads a QuantizedWeight (2-D, or a stack [E, ...])."""

    method: int
    group: int  # columns per scale (int4 group, fp8 block), else 1
    srows: int  # rows per scale row (fp8 block: 128), else 1
    qweight: torch.Tensor  # 3-D [E, N, stored columns]
    scale: torch.Tensor  # 3-D [E, N or scale rows, scale columns]
    words: torch.Tensor | None  # int8 / int4: qweight as int32 words (the GEMV's view)


def _prep(qw: QuantizedWeight, name: str) -> _W:
    qw.validate(name)
    m = method_code(qw)
    q = qw.qweight if qw.qweight.dim() == 3 else qw.qweight[None]
    s = qw.scale if qw.scale.dim() == qw.qweight.dim() else qw.scale[..., None]  # per channel: [.., N, 1]
    s = s if s.dim() == 3 else s[None]
    group = qw.group_size if m == INT4 else FP8_BLOCK if m == FP8_BLOCK_SCALED else 1
    words = q.view(torch.int32) if m in _WORD_VALUES else None
    return _W(m, group, FP8_BLOCK if m == FP8_BLOCK_SCALED else 1, q, s, words)


def _layout_ok(qw: QuantizedWeight) -> bool:
    q, s, k = qw.qweight, qw.scale, qw.in_features
    if not (q.is_contiguous() and s.is_contiguous() and s.dtype == torch.float32):
        return False
    if qw.method == "int8":
        return k % 4 == 0 and q.data_ptr() % 4 == 0
    if qw.method == "int4":
        g = qw.group_size
        return k % 8 == 0 and q.data_ptr() % 4 == 0 and g >= 32 and g & (g - 1) == 0 and k % g == 0
    return qw.method == "fp8" and (not qw.block or qw.group_size in (0, FP8_BLOCK))


def usable(x: torch.Tensor, qw: QuantizedWeight) -> bool:
    """Whether the kernels take x [T, K] with qw: a weight [N, K] (`linear`, `logits`) or a stack of experts
    [E, N, K] (`moe_experts`' w13; see `moe_usable` for the pair) of a known method in the format's layout
    (contiguous; int4 groups a power of two >= 32), a 16- or 32-bit float x on the weight's device."""
    try:
        qw.validate()
    except ValueError:
        return False
    return (qw.qweight.dim() in (2, 3) and x.dim() == 2 and x.dtype in MMA_DTYPES and x.shape[1] == qw.in_features
            and x.device == qw.device and (x.is_cuda or INTERPRET) and _layout_ok(qw))


def _gemv_shape(w: _W, k: int, use: str, config: tuple | None = None, x_mode: int = 0) -> tuple:
    """(BLOCK_N, num_warps, BLOCK_K, stages, xsplit) of a GEMV program from GEMV_CONFIGS' (or config's) (bytes a
    weight set, warps[, chunk, stages, xsplit]): the bytes over the stored bytes of a row's chunk (chunk:
    logical columns, 0 or absent: min(K, GEMV_CHUNK), the whole row while it fits; stages > 0: the chunk loop
    pipelined; xsplit (int4): x in one load, split in registers (1) or quantized to int8 (2, X_INT8); x_mode,
    where not 0, in its place)."""
    budget, warps, chunk, stages, xsplit = (*(config or GEMV_CONFIGS[w.method][use]), 0, 0, 0)[:5]
    block_k = min(triton.next_power_of_2(k), chunk or GEMV_CHUNK)
    if w.method in (INT4, FP8_BLOCK_SCALED):
        block_k = max(block_k, w.group)
    stored = min(k, block_k) // (2 if w.method == INT4 else 1)
    xsplit = int(x_mode or xsplit) if w.method == INT4 else 0
    return max(1, min(64, triton.next_power_of_2(max(1, budget // stored)))), warps, block_k, stages, xsplit


def _gemv(x, w: _W, out, n: int, k: int, use: str, *, cols: int = 1, ids=None, x_col_stride: int = 0,
          n_pre: int = 0, col_pre: int = 0, e_pre: int = 0, t: int = 1, bias=None, pdl: bool = False, x_scale=None,
          config: tuple | None = None, pre_norm: tuple | None = None, x_mode: int = 0):
    """Launch `_qgemv_kernel` for `use` ("linear": t tokens, one column, expert 0; "gate_up" / "down": the MoE
    at one token, a column per entry of ids, the expert's rows against x (gate_up, the same row for every
    column) or row col of x (down)); N output rows (gate_up: N gate and N up rows, N results). x_scale: x is
    fp8, with a scale per row (`act_quant`); config, x_mode: see `_gemv_shape`. pre_norm:
    (h, residual, norm_weight, eps): the n_pre columns norm their row themselves (the kernel's PRE_NORM)."""
    block_n, num_warps, block_k, stages, xsplit = _gemv_shape(w, k, use, config, x_mode)
    wt = w.words if w.words is not None else w.qweight
    stride_oc, stride_ot = (out.stride(0), 0) if ids is not None else (0, out.stride(0))
    stride_xc, stride_xt = (x_col_stride, 0) if ids is not None else (0, x.stride(0))
    h, r, nw, eps = pre_norm or (x, x, x, 0.0)
    _qgemv_kernel[(cols * triton.cdiv(n, block_n),)](
        x, x_scale if x_scale is not None else out, wt, w.scale, out, bias if bias is not None else out,
        ids if ids is not None else out, h, r, nw, eps, t, n, col_pre, e_pre, stride_xc, stride_xt, wt.stride(0),
        wt.stride(1), w.scale.stride(0), w.scale.stride(1), stride_oc, stride_ot, K=k, METHOD=w.method,
        EPW=_WORD_VALUES.get(w.method, 1), GROUP=w.group, SROWS=w.srows, GATED=use == "gate_up",
        HAS_IDS=ids is not None, PRE_COLS=n_pre, HAS_BIAS=bias is not None,
        X_SCALE=0 if x_scale is None else 2 if x_col_stride else 1, BLOCK_N=block_n, BLOCK_K=block_k, PDL=pdl,
        PIPE=stages, XSPLIT=xsplit, PRE_NORM=pre_norm is not None, num_warps=num_warps,
        **pdl_launch(pdl))
    return out


def x_int8_reference(x: torch.Tensor, group: int) -> torch.Tensor:
    """What the int4 GEMV with x in int8 (XSPLIT == X_INT8) multiplies instead of x [T, K]: x in fp32 quantized
    per `group` columns to int8 as `_x_int8` does (q = round-to-even(x * (127 / max|x|)), scale max|x| / 127),
    dequantized (fp32: the oracle's input)."""
    xg = x.float().unflatten(-1, (-1, group))
    amax = xg.abs().amax(-1, keepdim=True)
    inv = 127.0 / amax.clamp_min(1e-30)
    return (torch.round(xg * inv) * (amax / 127.0)).flatten(-2)


def gemv_x_int8(qw: QuantizedWeight, use: str, variant: str | None = None, *, t: int = 1,
                path: str | None = None) -> bool:
    """Whether a call at t tokens with this weight runs the int4 GEMV with x in int8 (X_INT8): `linear` ("linear";
    path as linear's) or `moe_experts` ("gate_up", "down"). Its oracle is then the product on `x_int8_reference(x)`."""
    if qw.method != "int4":
        return False
    w, v = _prep(qw, "weight"), moe_variant(variant)
    gemv = _linear_path(w, t, path) == "gemv" if use == "linear" else v.one_token_gemv(t)
    return gemv and bool(_gemv_shape(w, qw.in_features, use, v.gemv_config(w.method, use), v.int4_x)[4] == X_INT8)


def _mma_block_k(w: _W, block_k: int, join: bool = False) -> int:
    """A tiled step's BLOCK_K: within a scale group or block (the joined int4 step spans several groups)."""
    if w.method == FP8_BLOCK_SCALED or (w.method == INT4 and not join):
        block_k = min(block_k, w.group)
    return max(block_k, 32 if w.method == INT4 else 16)


def _mma(a, w: _W, out, n: int, k: int, cfg: dict, *, block_m: int, align=None, topk: int = 1, gated=False,
         a_by_token=False, out_by_pair=False, tk: int = 0, bias=None, a_scale=None, join: bool = False):
    """Launch `_qmm_kernel` with a GEMM config {BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages}; a_scale: a is
    fp8 with a scale per row (`act_quant`); join: int4 steps as `_int4_join_step`."""
    join = join and w.method == INT4
    block_k = _mma_block_k(w, cfg["BLOCK_K"], join)
    if a_scale is not None:
        block_k = max(block_k, 32)  # fp8 MMA: K steps of 32
    if align is not None:
        sorted_ids, expert_ids, num_post = align
        num_m = expert_ids.shape[0]
    else:
        sorted_ids = expert_ids = num_post = out
        num_m = triton.cdiv(a.shape[0], block_m)
    _qmm_kernel[(num_m * triton.cdiv(n, cfg["BLOCK_N"]),)](
        a, a_scale if a_scale is not None else out, w.qweight, w.scale, out, bias if bias is not None else out,
        sorted_ids, expert_ids, num_post, a.shape[0], tk, num_m, k, n, a.stride(0), w.qweight.stride(0),
        w.qweight.stride(1), w.scale.stride(0), w.scale.stride(1), out.stride(0), METHOD=w.method, GROUP=w.group,
        SROWS=w.srows, TOPK=topk, A_SCALED=a_scale is not None, ALIGNED=align is not None, GATED=gated,
        A_BY_TOKEN=a_by_token, OUT_BY_PAIR=out_by_pair, HAS_BIAS=bias is not None, BLOCK_M=block_m,
        BLOCK_N=cfg["BLOCK_N"], BLOCK_K=block_k, GROUP_M=cfg["GROUP_M"], EVEN_K=k % block_k == 0,
        IEEE=a.dtype == torch.float32, INTERP=INTERPRET, JOIN=join, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    return out


def linear_config(t: int) -> tuple[int, dict]:
    """(BLOCK_M, GEMM config) of the tiled linear at t tokens: narrow N tiles while few tokens leave the
    GPU's programs short of work (Param2's qkv at BLOCK_N 32: 96 programs a token block)."""
    if t <= 16:
        return 16, {"BLOCK_N": 32, "BLOCK_K": 128, "GROUP_M": 1, "num_warps": 4, "num_stages": 4}
    if t <= 64:
        return 32, {"BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 1, "num_warps": 4, "num_stages": 4}
    if t <= 256:
        return 64, {"BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 4, "num_warps": 4, "num_stages": 4}
    return 128, {"BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 4}


def gemv_max_tokens(w: _W) -> int:
    return int(_GEMV_OVERRIDE) if _GEMV_OVERRIDE else GEMV_MAX_TOKENS[w.method]


def _linear_path(w: _W, t: int, path: str | None) -> str:
    """The kernel `linear` runs at t tokens: "gemv" or "mma" (path, where given, forces it)."""
    return path or ("gemv" if t <= gemv_max_tokens(w) else "mma")


def linear(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None, *, out_dtype=None,
           act: str | None = None, path: str | None = None, config: tuple[int, dict] | None = None,
           variant: str | None = None) -> torch.Tensor:
    """x [T, K] @ dequantize(qw).T + bias, accumulated in fp32, rounded to out_dtype (default x's dtype; the head:
    float32) (see `usable`). act "fp8" (fp8 weights): x quantized per token first (`act_quant`; the tiled kernel
    multiplies on the fp8 tensor cores); "keep": not; None: `activation_mode`'s default. path "gemv" or "mma"
    forces a kernel (benchmarks); config: (BLOCK_M, GEMM config) of the tiled one. variant (default
    `moe_variant()`): its GEMV configs' "linear" entries, its int4_join and its linear_tiles apply here (the same
    kernels as the MoE's)."""
    if not usable(x, qw) or qw.qweight.dim() != 2:
        raise ValueError(f"quantized linear: x {x.dtype} {list(x.shape)} on {x.device} with the {qw.method} weight "
                         f"{list(qw.shape)} (qweight {qw.qweight.dtype} {list(qw.qweight.shape)}): not served "
                         "(see quant.usable)")
    t, k = x.shape
    n = qw.out_features
    w = _prep(qw, "weight")
    if x.stride(-1) != 1:
        x = x.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    out = torch.empty(t, n, dtype=out_dtype or x.dtype, device=x.device)
    if t == 0:
        return out
    act = activation_mode(w.method, t, act, head=out_dtype not in (None, x.dtype))
    a, a_scale = _activations(x, w, act)
    v = moe_variant(variant)
    if _linear_path(w, t, path) == "gemv":
        pdl = pdl_flag(x) and k <= GEMV_CHUNK
        config = v.gemv_config(w.method, "linear")
        if config is None and pdl and qw.qweight.numel() * qw.qweight.element_size() <= PRELOAD_MAX_BYTES:
            config = GEMV_PRELOAD[w.method]
        return _gemv(a, w, out, n, k, "linear", t=t, bias=bias, pdl=pdl, x_scale=a_scale, config=config,
                     x_mode=v.int4_x)
    block_m, cfg = config or linear_config(t)
    if v.linear_tiles and config is None:
        cfg = {**cfg, **v.linear_tiles}
    return _mma(a, w, out, n, k, cfg, block_m=block_m, bias=bias, a_scale=a_scale, join=v.int4_join)


def one_expert(qw: QuantizedWeight) -> QuantizedWeight:
    """qw [N, K] as a stack of one expert [1, N, K] (a view): a dense MLP at one token runs as one expert."""
    return QuantizedWeight(qw.method, qw.qweight[None], qw.scale[None], (1, *qw.shape), qw.group_size)


def activation_mode(w_method: int, t: int, act: str | None = None, head: bool = False) -> str | None:
    """What the activations of a product at t tokens become: act as given ("fp8": quantized per token; "keep":
    as they come), else (None) the default: "fp8" for fp8 weights from FP8_ACT_TOKENS tokens, except for the
    head (head: float32 logits, kept weight-only). Returns "fp8" or None."""
    if act is not None:
        return None if act == "keep" else act
    fp8 = w_method in (FP8, FP8_BLOCK_SCALED) and 0 < FP8_ACT_TOKENS <= t
    return "fp8" if fp8 and not head else None


def _activations(x, w: _W, act: str | None):
    """(x, None), or with act="fp8" x quantized per row: (q, scale)."""
    if act is None:
        return x, None
    if act != "fp8" or w.method not in (FP8, FP8_BLOCK_SCALED):
        raise ValueError(f"act={act!r}: activation quantization is fp8, for fp8 weights")
    return act_quant(x)


# ------------------------------------------------------------------------------ the fused MoE
def moe_config(t: int, e: int, h: int, i: int, topk: int, dtype, method: int) -> dict:
    """moe_configs.py's tuned table of the bf16 MoE (the slot blocks and tile shapes), with each GEMM's BLOCK_K
    within the weight's scale groups (`_mma_block_k` does that at launch)."""
    return get_config(t, e, h, i, topk, dtype)


class MoeVariant(NamedTuple):
    """A way to run the quantized MoE, selectable for A/B runs on a GPU (`moe_experts(variant=)`, or for the
    whole engine the env var P2M_QUANT_MOE_VARIANT, read once at import). docs/quant-kernels.md has the
    analysis behind each and the H100's measurements that made the defaults."""

    one_token: str = "gemv"  # at one token: "gemv" (`_qgemv_kernel`) or "mma" (the tiles on aligned slots)
    gemv: dict | None = None  # method code -> {use: config}: replaces GEMV_CONFIGS' entries (`_gemv_shape`);
    # "linear" ones serve `linear` at a few tokens
    tiles: dict | None = None  # merged into both tiled GEMMs' configs (e.g. {"num_stages": 5, "BLOCK_K": 256})
    int4_join: bool = True  # int4 tiles (the MoE's and the linear layers'): `_int4_join_step` (1.3-2.5x the
    # unjoined step on an H100 at 8-256 tokens)
    linear_tiles: dict | None = None  # merged into `linear_config`'s GEMM config (e.g. {"BLOCK_N": 16}: more programs)
    behind_router: bool = True  # at one token: the gate/up launched behind the router (`gate_up_one_token`)
    int4_x: int = 0  # every int4 GEMV's x (the MoE's and the linear layers'): 0 its shape's, 1 split in registers,
    # 2 (X_INT8) quantized to int8 per group (`_gemv_shape`)

    def gemv_config(self, method: int, use: str) -> tuple | None:
        """Its GEMV shape for this method and use ("linear", "gate_up", "down"); None: GEMV_CONFIGS' (or, for
        a linear layer, GEMV_PRELOAD's where that applies)."""
        return (self.gemv or {}).get(method, {}).get(use)

    def one_token_gemv(self, t: int) -> bool:
        """Whether the MoE at t tokens runs the GEMV (one token, an expert per column of ids), not the tiles."""
        return t == 1 and self.one_token == "gemv"

    def joins_otherwise(self, method: int) -> bool:
        """Whether its int4 tiles step otherwise than the default's (int4 weights only)."""
        return method == INT4 and self.int4_join != MoeVariant._field_defaults["int4_join"]

    def changes(self, t: int, method: int) -> bool:
        """Whether, at t tokens with weights of this method, something else runs than the default's."""
        if self.one_token_gemv(t):  # (its "linear" entries are not the MoE's)
            return any(self.gemv_config(method, use) for use in ("gate_up", "down")) or (method == INT4 and
                                                                                       self.int4_x != 0)
        return t == 1 or bool(self.tiles) or self.joins_otherwise(method)


# GEMV shapes of the variants (`_gemv_shape`), by method and use ("linear": the linear layers at a few tokens).
# Unpipelined (bytes a weight set, warps): a whole row's chunk in registers, no shared-memory pipeline.
_PLAIN_GEMV = {INT8: {"linear": (16384, 8), "gate_up": (8192, 8), "down": (16384, 8)},
               INT4: {"linear": (8192, 8), "gate_up": (4096, 8), "down": (8192, 8)},
               FP8: {"linear": (16384, 4), "gate_up": (8192, 4), "down": (16384, 4)},
               FP8_BLOCK_SCALED: {"linear": (16384, 4), "gate_up": (8192, 4), "down": (16384, 4)}}
# Pipelined: (bytes a weight set and chunk, warps, chunk columns, stages); 8 rows a program, so that the dense
# MLP's down at one token (N 2048) keeps 256 programs.
_PIPE_GEMV = {m: {"gate_up": (2048, 4, 512, 4), "down": (2048, 4, 512, 4), "linear": (2048, 4, 512, 4)}
              for m in _PLAIN_GEMV}
_XSPLIT_GEMV = {INT4: {use: (*cfg, 0, 0, X_SPLIT) for use, cfg in _PLAIN_GEMV[INT4].items()}}
_SMALL_GEMV = {INT4: {"gate_up": (2048, 4), "down": (4096, 4), "linear": (2048, 4)},
               FP8: {"gate_up": (4096, 4), "down": (8192, 4), "linear": (4096, 4)},
               FP8_BLOCK_SCALED: {"gate_up": (4096, 4), "down": (8192, 4), "linear": (4096, 4)}}
_WIDE_GEMV = {INT4: {"gate_up": (16384, 8), "down": (16384, 8)}, FP8: {"gate_up": (16384, 4), "down": (32768, 8)},
              FP8_BLOCK_SCALED: {"gate_up": (16384, 4), "down": (32768, 8)}, INT8: {"gate_up": (16384, 8)}}
MOE_VARIANTS = {
    "default": MoeVariant(),
    "gemv_plain": MoeVariant(gemv=_PLAIN_GEMV),  # the unpipelined GEMV shapes
    "gemv_wide": MoeVariant(gemv=_WIDE_GEMV),  # more bytes in flight a program at one token, unpipelined
    "gemv_pipe": MoeVariant(gemv=_PIPE_GEMV),  # chunks of 512 columns, 4 stages
    # int4: the default's pipeline with x read by nibble position (strided 2-byte loads)
    "gemv_pipe_noxsplit": MoeVariant(gemv={INT4: {use: _PIPE_SHAPE for use in ("gate_up", "down", "linear")}}),
    "gemv_small": MoeVariant(gemv=_SMALL_GEMV),  # moe.py's one-token shape: few rows, 4 warps, many programs
    # linear layers at a few tokens: the pipelined shape even where the preloaded one applies (GEMV_PRELOAD)
    "linear_pipe": MoeVariant(gemv={m: {"linear": (*_PIPE_SHAPE, m == INT4)} for m in _PLAIN_GEMV}),
    "linear_preload": MoeVariant(gemv={m: {"linear": GEMV_PRELOAD[m]} for m in _PLAIN_GEMV}),  # (tests: no PDL)
    "gemv_xsplit": MoeVariant(gemv=_XSPLIT_GEMV),  # int4: x in 16-byte loads, split in registers
    # int4: every GEMV (the MoE at one token, the linear layers at a few tokens) with x in bf16, split in registers
    # (weight-only: the products of the dequantized weights with x as it comes)
    "gemv_a16": MoeVariant(int4_x=X_SPLIT),
    # int4 at one token: 8 or 32 rows a program (the default's 16 share x's quantization)
    "a8_n8": MoeVariant(gemv={INT4: {use: (4096, 4, 1024, 3, X_INT8) for use in ("gate_up", "down")}}),
    "a8_n32": MoeVariant(gemv={INT4: {use: (16384, 4, 1024, 3, X_INT8) for use in ("gate_up", "down")}}),
    "mma1": MoeVariant(one_token="mma"),  # one token on the tiles: a K loop pipelined through shared memory
    "deep": MoeVariant(tiles={"num_stages": 5}),  # more K steps in flight a tile program
    "nojoin": MoeVariant(int4_join=False),  # int4 tiles: x's even and odd columns loaded apart
    "k256": MoeVariant(tiles={"BLOCK_K": 256}),  # int4: 128 bytes a row a step
    "lin16": MoeVariant(linear_tiles={"BLOCK_N": 16}),  # linears in tiles: N tiles of 16, more programs
    "after_router": MoeVariant(behind_router=False),  # one token: the gate/up launched after the router has ended
}
_VARIANT_ENV = os.environ.get("P2M_QUANT_MOE_VARIANT", "default")


@functools.lru_cache(maxsize=64)
def moe_variant(name: str | None = None) -> MoeVariant:
    """MOE_VARIANTS[name] (None: P2M_QUANT_MOE_VARIANT's, else "default"); "a+b": a's fields that differ from
    the default's, then b's over them (e.g. a one-token GEMV and a tile variant). An unknown name raises,
    naming the known ones."""
    name = _VARIANT_ENV if name is None else name
    merged = MoeVariant()
    for part in name.split("+"):
        if part not in MOE_VARIANTS:
            src = "P2M_QUANT_MOE_VARIANT" if name == _VARIANT_ENV else "variant"
            raise ValueError(f"{src}={name!r}: {part!r} is not a quantized MoE variant; known: "
                             f"{', '.join(MOE_VARIANTS)} (joined with '+')")
        v, base = MOE_VARIANTS[part], MoeVariant._field_defaults
        merged = merged._replace(**{f: getattr(v, f) for f in v._fields if getattr(v, f) != base[f]})
    return merged


def _variant_config(cfg: dict, v: MoeVariant) -> dict:
    if not v.tiles:
        return cfg
    return {**cfg, "gate_up": {**cfg["gate_up"], **v.tiles}, "down": {**cfg["down"], **v.tiles}}


def _check_moe(x, w13: QuantizedWeight, w2: QuantizedWeight, weights, ids):
    if w13.qweight.dim() != 3 or w2.qweight.dim() != 3:
        raise ValueError(f"moe_experts: w13 and w2 must stack experts [E, N, K]; got shapes {list(w13.shape)} and "
                         f"{list(w2.shape)}")
    e, two_i, h = w13.shape
    if two_i % 2 or tuple(w2.shape) != (e, h, two_i // 2):
        raise ValueError(f"moe_experts: w13 {list(w13.shape)} needs [E, 2I, H] and w2 [E, H, I]; got w2 "
                         f"{list(w2.shape)}")
    if x.dim() != 2 or x.shape[1] != h or x.dtype not in MMA_DTYPES:
        raise ValueError(f"moe_experts: x {x.dtype} {list(x.shape)} does not fit hidden size {h}")
    if ids.shape != weights.shape or ids.dim() != 2 or ids.shape[0] != x.shape[0]:
        raise ValueError(f"moe_experts: weights {list(weights.shape)} and ids {list(ids.shape)} must both be "
                         f"[T={x.shape[0]}, k]")
    for name, qw in (("w13", w13), ("w2", w2)):
        qw.validate(name)
        if not _layout_ok(qw):
            raise ValueError(f"moe_experts: {name} ({qw.method}, group {qw.group_size}) is not in a layout the "
                             "kernels read (contiguous; int4 groups a power of two >= 32)")


def moe_usable(x: torch.Tensor, w13: QuantizedWeight, w2: QuantizedWeight) -> bool:
    """Whether `moe_experts` serves x with these stacked experts (else it raises, naming the problem)."""
    t = x.shape[0] if x.dim() == 2 else 0
    ids = torch.zeros(t, 1, dtype=torch.int32, device=x.device)
    try:
        _check_moe(x, w13, w2, ids.float(), ids)
    except ValueError:
        return False
    return (x.is_cuda or INTERPRET) and w13.device == x.device == w2.device


def runs_behind_router(x: torch.Tensor, w13: QuantizedWeight, variant: str | None = None) -> bool:
    """Whether `gate_up_one_token` takes x [1, H] with these stacked experts: the one-token GEMV with bf16/fp32
    activations reading x in contiguous chunks (fp8, int4's split x; not int8 nor the unsplit int4 shapes)."""
    v = moe_variant(variant)
    if not (v.behind_router and v.one_token == "gemv" and usable(x, w13) and w13.qweight.dim() == 3):
        return False
    w = _prep(w13, "w13")
    xsplit = _gemv_shape(w, w13.shape[2], "gate_up", v.gemv_config(w.method, "gate_up"), v.int4_x)[4]
    return activation_mode(w.method, 1) is None and (w.method in (FP8, FP8_BLOCK_SCALED) or xsplit)


def gate_up_one_token(x: torch.Tensor, w13: QuantizedWeight, ids: torch.Tensor, norm: tuple, pdl: bool,
                      inter: torch.Tensor, variant: str | None = None) -> torch.Tensor:
    """The experts' gate/up at one token (`runs_behind_router`), launched right behind the router with PDL
    (`moe.add_rms_norm_gate_route_gate_up`'s gate_up): inter [k, I], row c = silu(x . gate) * up of the expert
    ids[0, c]. norm = (h, residual, norm_weight, eps, n_app), the router's input: the folded shared expert's
    programs (the last n_app columns) norm that row themselves and stream their weights while the router runs
    (`_qgemv_kernel`'s PRE_NORM); the others wait for its x and ids. `moe_experts(..., started=inter)` goes on."""
    h, residual, norm_weight, eps, n_app = norm
    w, k, v = _prep(w13, "w13"), ids.numel(), moe_variant(variant)
    return _gemv(x, w, inter, w13.shape[1] // 2, w13.shape[2], "gate_up", cols=k, ids=ids, n_pre=n_app,
                 col_pre=k - n_app, e_pre=w13.shape[0] - n_app, pdl=pdl, config=v.gemv_config(w.method, "gate_up"),
                 pre_norm=(h, residual, norm_weight, eps), x_mode=v.int4_x)


def moe_experts(x: torch.Tensor, w13: QuantizedWeight, w2: QuantizedWeight, weights: torch.Tensor, ids: torch.Tensor,
                *, unsummed: bool = False, num_appended: int = 0, config: dict | None = None,
                act: str | None = None, variant: str | None = None,
                started: torch.Tensor | None = None) -> torch.Tensor:
    """sum_k weights[t, k] * down_e(silu(gate_e(x[t])) * up_e(x[t])), e = ids[t, k] (-1: nothing), in x's
    dtype; the roundings where moe.py's kernels (and the oracle) have them. unsummed: each (token, k) pair's
    output [T*k, H] (rows of ids -1 undefined), for the next norm to sum (norm.expert_sum_add_rms_norm).
    num_appended: the last columns of ids are the folded shared expert (experts E - n.., every token):
    at one token their weights are loaded before waiting for the kernel in front (the router). config: the
    tiled GEMMs' block sizes (moe_configs.py's format; default: `moe_config`). act "fp8" (fp8 weights): x and
    the intermediate activations quantized per row (`act_quant`), the tiled GEMMs on the fp8 tensor cores;
    "keep": not; None: `activation_mode`'s default.
    variant: a name of MOE_VARIANTS (default: `moe_variant()`). started: one token's gate/up output [k, I],
    launched behind the router (`gate_up_one_token`): only the down runs here."""
    v = moe_variant(variant)
    _check_moe(x, w13, w2, weights, ids)
    t, hidden = x.shape
    topk = ids.shape[1]
    e, two_i, _ = w13.shape
    inter_size = two_i // 2
    if t == 0:
        return torch.empty(t * topk if unsummed else t, hidden, dtype=x.dtype, device=x.device)
    x = x if x.stride(-1) == 1 else x.contiguous()
    ids = ids.contiguous()
    weights = weights if weights.stride(-1) == 1 else weights.contiguous()
    g13, g2 = _prep(w13, "w13"), _prep(w2, "w2")
    act = activation_mode(g13.method, t, act)
    gemv = v.one_token_gemv(t)
    if started is not None and (not gemv or tuple(started.shape) != (topk, inter_size)):
        raise ValueError(f"moe_experts: started {list(started.shape)} is one token's gate/up [k={topk}, "
                         f"I={inter_size}], for the one-token GEMV (here {t} tokens, one_token={v.one_token!r})")
    if gemv:  # matrix-vector products, an expert per column of ids (moe.py's ONE_TOKEN)
        inter = started
        if inter is None:
            inter = torch.empty(topk, inter_size, dtype=x.dtype, device=x.device)
            a, a_scale = _activations(x, g13, act)
            _gemv(a, g13, inter, inter_size, hidden, "gate_up", cols=topk, ids=ids, n_pre=num_appended,
                  col_pre=topk - num_appended, e_pre=e - num_appended, pdl=pdl_flag(x) and act is None,
                  x_scale=a_scale, config=v.gemv_config(g13.method, "gate_up"), x_mode=v.int4_x)
        pair_out = torch.empty(topk, hidden, dtype=x.dtype, device=x.device)
        a, a_scale = _activations(inter, g2, act)
        _gemv(a, g2, pair_out, hidden, inter_size, "down", cols=topk, ids=ids, x_col_stride=a.stride(0),
              x_scale=a_scale, config=v.gemv_config(g13.method, "down"), x_mode=v.int4_x)
    else:
        cfg = _variant_config(config or moe_config(t, e, hidden, inter_size, topk, x.dtype, g13.method), v)
        bm = cfg["BLOCK_M"]
        align = moe_align(ids, e, bm)
        inter = torch.empty(align[0].shape[0], inter_size, dtype=x.dtype, device=x.device)
        a, a_scale = _activations(x, g13, act)
        _mma(a, g13, inter, inter_size, hidden, cfg["gate_up"], block_m=bm, align=align, topk=topk, gated=True,
             a_by_token=True, tk=t * topk, a_scale=a_scale, join=v.int4_join)
        pair_out = torch.empty(t * topk, hidden, dtype=x.dtype, device=x.device)
        a, a_scale = _activations(inter, g2, act)
        _mma(a, g2, pair_out, hidden, inter_size, cfg["down"], block_m=bm, align=align, out_by_pair=True,
             tk=t * topk, a_scale=a_scale, join=v.int4_join)
    if unsummed:
        return pair_out
    return combine(pair_out, weights, ids, torch.empty(t, hidden, dtype=x.dtype, device=x.device))
