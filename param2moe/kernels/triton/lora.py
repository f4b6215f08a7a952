"""Batched LoRA in Triton. Oracle: `param2moe.kernels.lora` (same functions, same roundings).

    lora_rows(index [M] int32, num_buckets) -> LoRARows        (once per step, shared by every module)
    add_lora(y [M, S*out], x [M, in], a [NB, S, R, in], b [NB, S, out, R], rows) -> y, updated in place

Rows are grouped by bucket (adapter slot; for routed experts slot * E + expert) so that a program
multiplies a tile of up to BLOCK_M rows of one bucket by that bucket's weights, on tensor cores, each
weight read once a tile:
1. `lora_rows` (torch ops, no host sync: CUDA-graph capturable): a stable sort of the rows by bucket,
   rows without an adapter (-1) last; each bucket's run cut into tiles of BLOCK_M rows; tile_start[i]
   is where tile i starts in sorted order (M for unused tiles). There are at most cdiv(M, BLOCK_M) +
   min(NB, M) tiles, which sizes the grid: every launch shape is a function of M and the slot tensors.
2. shrink: u[split, row, j, :] = x[row, K-split] @ a[bucket, j, :, K-split].T in fp32, per (tile, slice,
   split); the K splits give decode-sized batches enough programs, and are summed in a fixed order in
   step 3 (no atomics: the same result every run).
3. expand: y[row, j*out + n] += u[row, j] (rounded to the weights' dtype) @ b[bucket, j, n].T, per
   (tile, slice, N block). Every (row, column) belongs to one program: a plain read-add-write.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..lora import ExpertLoRA, pair_buckets
from . import moe as tri_moe
from ._common import INTERPRET, mma


class LoRARows(NamedTuple):
    key: torch.Tensor  # [M] int32: the buckets in sorted order (num_buckets for rows without an adapter)
    order: torch.Tensor  # [M] int32: the row at each sorted position
    tile_start: torch.Tensor  # [tiles] int32: sorted position of each tile's first row, M for unused tiles
    block_m: int


def lora_rows(index: torch.Tensor, num_buckets: int) -> LoRARows:
    m = index.numel()
    bm = 16 if m <= 128 else 64
    key = torch.where(index >= 0, index, num_buckets).to(torch.int32)
    key, order = torch.sort(key, stable=True)
    pos = torch.arange(m, device=index.device)
    head = torch.ones(m, dtype=torch.bool, device=index.device)
    head[1:] = key[1:] != key[:-1]
    run_start = torch.cummax(torch.where(head, pos, 0), 0).values
    tile_head = ((pos - run_start) % bm == 0) & (key < num_buckets)
    tiles = triton.cdiv(m, bm) + min(num_buckets, m)
    tile_id = torch.where(tile_head, torch.cumsum(tile_head, 0) - 1, tiles)  # not a head: the dummy entry
    tile_start = torch.full((tiles + 1,), m, dtype=torch.int32, device=index.device)
    tile_start.scatter_(0, tile_id, pos.to(torch.int32))
    return LoRARows(key, order.to(torch.int32), tile_start[:tiles], bm)


@triton.jit
def _tile_rows(key_ptr, order_ptr, tile_ptr, M, BLOCK_M: tl.constexpr):
    """(bucket, rows [BLOCK_M], valid [BLOCK_M]) of this program's tile; bucket -1: no tile."""
    start = tl.load(tile_ptr + tl.program_id(0))
    offs = start + tl.arange(0, BLOCK_M)
    bucket = tl.load(key_ptr + tl.minimum(start, M - 1))
    inside = offs < M  # all false past the used tiles (start = M)
    keys = tl.load(key_ptr + offs, mask=inside, other=-1)
    valid = (keys == bucket) & inside
    rows = tl.load(order_ptr + offs, mask=valid, other=0).to(tl.int64)
    return tl.where(start < M, bucket, -1).to(tl.int64), rows, valid


@triton.jit(do_not_specialize=["M"])
def _shrink_kernel(x_ptr, a_ptr, u_ptr, key_ptr, order_ptr, tile_ptr, M, K, K_BLOCKS,
                   stride_xm, stride_ab, stride_as, stride_ar, stride_up, stride_um, stride_us,
                   R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                   IEEE: tl.constexpr, INTERP: tl.constexpr):
    bucket, rows, valid = _tile_rows(key_ptr, order_ptr, tile_ptr, M, BLOCK_M)
    if bucket < 0:
        return
    j, split = tl.program_id(1), tl.program_id(2)
    offs_r = tl.arange(0, BLOCK_R)
    rmask = offs_r < R
    offs_k = split * K_BLOCKS * BLOCK_K + tl.arange(0, BLOCK_K)  # this split's K_BLOCKS blocks of K
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :]
    a_ptrs = a_ptr + bucket * stride_ab + j * stride_as + offs_r[None, :] * stride_ar + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for kb in range(0, K_BLOCKS):
        kmask = offs_k < K - kb * BLOCK_K
        xt = tl.load(x_ptrs, mask=valid[:, None] & kmask[None, :], other=0.0)
        at = tl.load(a_ptrs, mask=kmask[:, None] & rmask[None, :], other=0.0)
        acc = mma(xt.to(at.dtype), at, acc, IEEE, INTERP)
        x_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
    u_ptrs = u_ptr + split * stride_up + rows[:, None] * stride_um + j * stride_us + offs_r[None, :]
    tl.store(u_ptrs, acc, mask=valid[:, None] & rmask[None, :])


@triton.jit(do_not_specialize=["M", "N"])
def _expand_kernel(u_ptr, b_ptr, y_ptr, key_ptr, order_ptr, tile_ptr, M, N,
                   stride_up, stride_um, stride_us, stride_bb, stride_bs, stride_bn, stride_ym,
                   R: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_N: tl.constexpr, IEEE: tl.constexpr, INTERP: tl.constexpr):
    bucket, rows, valid = _tile_rows(key_ptr, order_ptr, tile_ptr, M, BLOCK_M)
    if bucket < 0:
        return
    j, pid_n = tl.program_id(1), tl.program_id(2)
    offs_r = tl.arange(0, BLOCK_R)
    rmask = offs_r < R
    u_ptrs = u_ptr + rows[:, None] * stride_um + j * stride_us + offs_r[None, :]
    umask = valid[:, None] & rmask[None, :]
    u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for s in range(SPLIT_K):
        u += tl.load(u_ptrs + s * stride_up, mask=umask, other=0.0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    bt = tl.load(b_ptr + bucket * stride_bb + j * stride_bs + offs_n[None, :].to(tl.int64) * stride_bn +
                 offs_r[:, None], mask=rmask[:, None] & nmask[None, :], other=0.0)
    acc = mma(u.to(bt.dtype), bt, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), IEEE, INTERP)
    y_ptrs = y_ptr + rows[:, None] * stride_ym + (j * N + offs_n)[None, :]
    ymask = valid[:, None] & nmask[None, :]
    y = tl.load(y_ptrs, mask=ymask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=ymask)


def _split_k(tiles_per_slice: int, k: int, block_k: int) -> int:
    """K splits giving a decode-sized launch about 128 programs, each at least 4 blocks of K."""
    most = max(1, k // (4 * block_k))
    return max(1, min(most, 128 // max(1, tiles_per_slice), 16))


def add_lora(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rows: LoRARows) -> torch.Tensor:
    m, k = x.shape
    if m == 0:
        return y
    nb, slices, rank, _ = a.shape
    n = b.shape[2]
    assert x.stride(-1) == 1 and y.stride(-1) == 1 and a.is_contiguous() and b.is_contiguous()
    tiles = rows.tile_start.numel()
    block_r, block_k = max(16, triton.next_power_of_2(rank)), 64
    split = _split_k(tiles * slices, k, block_k)
    k_blocks = triton.cdiv(triton.cdiv(k, split), block_k)
    u = torch.empty(split, m, slices, rank, dtype=torch.float32, device=x.device)
    ieee = a.dtype == torch.float32
    _shrink_kernel[(tiles, slices, split)](
        x, a, u, rows.key, rows.order, rows.tile_start, m, k, k_blocks,
        x.stride(0), a.stride(0), a.stride(1), a.stride(2), u.stride(0), u.stride(1), u.stride(2),
        R=rank, BLOCK_M=rows.block_m, BLOCK_R=block_r, BLOCK_K=block_k, IEEE=ieee, INTERP=INTERPRET, num_warps=4)
    block_n = 64 if n >= 64 else max(16, triton.next_power_of_2(n))
    _expand_kernel[(tiles, slices, triton.cdiv(n, block_n))](
        u, b, y, rows.key, rows.order, rows.tile_start, m, n,
        u.stride(0), u.stride(1), u.stride(2), b.stride(0), b.stride(1), b.stride(2), y.stride(0),
        R=rank, SPLIT_K=split, BLOCK_M=rows.block_m, BLOCK_R=block_r, BLOCK_N=block_n, IEEE=ieee,
        INTERP=INTERPRET, num_warps=4)
    return y


def moe_experts_lora(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                     lora: ExpertLoRA, unsummed: bool = False) -> torch.Tensor:
    """The fused MoE (triton/moe.py) with each pair's expert adapted by its token's adapter: the delta of
    gate and up (fp32, by pair) added to the gate/up GEMM's accumulators before the activation, that of
    down added to each pair's output before the combine."""
    t, k = ids.shape
    rows = lora_rows(pair_buckets(lora, ids, w13.shape[0]), lora.a13.shape[0])
    xs = x[:, None].expand(t, k, x.shape[1]).reshape(t * k, x.shape[1])  # each pair's token row
    delta = add_lora(torch.zeros(t * k, w13.shape[1], dtype=torch.float32, device=x.device), xs, lora.a13,
                     lora.b13, rows)

    def down_lora(inter_by_pair, pair_out):
        add_lora(pair_out, inter_by_pair, lora.a2, lora.b2, rows)

    return tri_moe.moe_experts(x, w13, w2, weights, ids, unsummed=unsummed, gate_up_delta=delta,
                               down_lora=down_lora)
