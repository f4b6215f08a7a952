"""Fused MoE experts in Triton. Oracle: `param2moe.kernels.moe.moe_experts`.

    moe_experts(x [T, H], w13 [E, 2I, H], w2 [E, H, I], weights [T, K] fp32, ids [T, K]) -> [T, H]

Four steps, no host sync, every launch shape a function of T alone (CUDA-graph capturable):
1. align (`moe_align`): the T*K (token, k) pairs are grouped by expert into a slot array whose every
   expert segment is padded to a multiple of BLOCK_M (padding slots hold the sentinel T*K); each BLOCK_M
   block of slots belongs to one expert (`expert_ids`); `num_post` is the used length. One program
   does it all for decode batches (histogram, then a sort); larger ones use count -> offsets -> scatter
   (atomic counters).
2. gate/up GEMM with SiLU-and-mul fused: per (slot block, intermediate block), the block's token rows
   of x (gathered) times the expert's gate rows and up rows (two accumulators), then
   silu(gate) * up -> `inter` [slots, I], stored by slot (contiguous rows for step 3).
3. down GEMM: `inter` rows times the expert's w2 -> one row per (token, k) pair, [T*K, H].
4. combine: out[t] = sum_k weights[t, k] * pair_out[t, k] in fp32 (pairs whose id is -1 skipped).
The roundings to the activation dtype sit where the oracle has them (gate, up, silu(gate), its product
with up, each pair's output), so bf16 results match it to within a rounding.
Padding blocks exit at once; the grid of the GEMMs is sized by the most blocks T*K pairs can need.
One token skips the align: its K experts are products of a matrix and a vector (`ONE_TOKEN` below).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import routing
from ._common import INTERPRET, mma, pdl_flag, pdl_launch, wait_for_previous
from .moe_configs import get_config
from .norm import normed_chunk, row_rstd

SMALL_ALIGN_MAX_PAIRS = 1024  # up to this many (token, k) pairs the align is one program


# ----------------------------------------------------------------------------------- align
# Within an expert's segment the pairs land in atomic order (not sorted): every output row is computed
# on its own, so the result does not depend on that order.
@triton.jit
def _align_layout(counts, ex, sorted_ptr, expert_ids_ptr, npost_ptr, cursor_ptr, TK, MAX_BLOCKS,
                  E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_B: tl.constexpr):
    """From the per-expert counts: the padded segments, num_post, each block's expert, the padding
    sentinels, and the cursors (segment starts) the scatter step advances."""
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    tl.store(npost_ptr, tl.sum(padded, axis=0))
    tl.store(cursor_ptr + ex, starts, mask=ex < E)
    j = tl.arange(0, BLOCK_M)
    pad_slot = starts[:, None] + counts[:, None] + j[None, :]
    tl.store(sorted_ptr + pad_slot, tl.full((BLOCK_E, BLOCK_M), 0, tl.int32) + TK,
             mask=j[None, :] < (padded - counts)[:, None])
    for i in range(0, tl.cdiv(MAX_BLOCKS, BLOCK_B)):
        b = i * BLOCK_B + tl.arange(0, BLOCK_B)
        owner = tl.sum(((ends[None, :] <= b[:, None] * BLOCK_M) & (ex[None, :] < E)).to(tl.int32), axis=1)
        tl.store(expert_ids_ptr + b, owner, mask=b < MAX_BLOCKS)


@triton.jit(do_not_specialize=["TK", "MAX_BLOCKS"])
def _align_sort_kernel(ids_ptr, work_ptr, sorted_ptr, expert_ids_ptr, npost_ptr, TK, MAX_BLOCKS,
                       E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr,
                       BLOCK_B: tl.constexpr, SHIFT: tl.constexpr):
    """The whole align in one program (decode sizes), without atomics: the counts by histogram, the pairs
    sorted by (expert, pair) so that a pair's place in the sorted order is its expert's unpadded start
    plus its rank; its slot adds the padding of the experts before it (a per-expert shift, E int32 of
    scratch). Within a segment the pairs stay in order."""
    p = tl.arange(0, BLOCK_P)
    ex = tl.arange(0, BLOCK_E)
    e = tl.load(ids_ptr + p, mask=p < TK, other=-1).to(tl.int32)
    e_c = tl.where((e >= 0) & (e < E) & (p < TK), e, E)  # E: no expert (a bin of its own, sorted last)
    counts = tl.where(ex < E, tl.histogram(e_c, BLOCK_E), 0)
    _align_layout(counts, ex, sorted_ptr, expert_ids_ptr, npost_ptr, work_ptr + E, TK, MAX_BLOCKS,
                  E, BLOCK_M, BLOCK_E, BLOCK_B)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    shift = (tl.cumsum(padded, axis=0) - padded) - (tl.cumsum(counts, axis=0) - counts)
    tl.store(work_ptr + ex, shift, mask=ex < E)
    keys = tl.sort((e_c << SHIFT) | p)
    e_s = keys >> SHIFT
    ok = e_s < E
    tl.debug_barrier()  # the shifts stored above, visible to the whole program
    slot = p + tl.load(work_ptr + tl.where(ok, e_s, 0), mask=ok, other=0)
    tl.store(sorted_ptr + slot, keys & ((1 << SHIFT) - 1), mask=ok)


@triton.jit(do_not_specialize=["TK"])
def _align_count_kernel(ids_ptr, counts_ptr, TK, E: tl.constexpr, BLOCK_P: tl.constexpr):
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    e = tl.load(ids_ptr + p, mask=p < TK, other=-1).to(tl.int32)
    valid = (e >= 0) & (e < E) & (p < TK)
    tl.atomic_add(counts_ptr + tl.where(valid, e, 0), tl.full((BLOCK_P,), 1, tl.int32), mask=valid)


@triton.jit(do_not_specialize=["TK", "MAX_BLOCKS"])
def _align_offsets_kernel(counts_ptr, cursor_ptr, sorted_ptr, expert_ids_ptr, npost_ptr, TK, MAX_BLOCKS,
                          E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_B: tl.constexpr):
    ex = tl.arange(0, BLOCK_E)
    counts = tl.load(counts_ptr + ex, mask=ex < E, other=0)
    _align_layout(counts, ex, sorted_ptr, expert_ids_ptr, npost_ptr, cursor_ptr, TK, MAX_BLOCKS,
                  E, BLOCK_M, BLOCK_E, BLOCK_B)


@triton.jit(do_not_specialize=["TK"])
def _align_scatter_kernel(ids_ptr, cursor_ptr, sorted_ptr, TK, E: tl.constexpr, BLOCK_P: tl.constexpr):
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    e = tl.load(ids_ptr + p, mask=p < TK, other=-1).to(tl.int32)
    valid = (e >= 0) & (e < E) & (p < TK)
    pos = tl.atomic_add(cursor_ptr + tl.where(valid, e, 0), tl.full((BLOCK_P,), 1, tl.int32), mask=valid)
    tl.store(sorted_ptr + pos, p, mask=valid)


def moe_align(ids: torch.Tensor, num_experts: int, block_m: int):
    """Group the (token, k) pairs of ids [T, K] by expert. Returns (sorted_ids [max_slots] int32,
    expert_ids [max_blocks] int32, num_post [1] int32): slots past num_post are unused."""
    tk = ids.numel()
    max_slots = tk + min(num_experts, tk) * (block_m - 1)
    max_blocks = triton.cdiv(max_slots, block_m)
    dev = ids.device
    flat = ids.reshape(-1)
    sorted_ids = torch.empty(max_slots, dtype=torch.int32, device=dev)
    expert_ids = torch.empty(max_blocks, dtype=torch.int32, device=dev)
    block_e = triton.next_power_of_2(num_experts)
    block_b = min(64, triton.next_power_of_2(max_blocks))
    if tk <= SMALL_ALIGN_MAX_PAIRS:
        work = torch.empty(2 * num_experts + 1, dtype=torch.int32, device=dev)
        num_post = work[2 * num_experts:]
        block_p = triton.next_power_of_2(tk)
        _align_sort_kernel[(1,)](flat, work, sorted_ids, expert_ids, num_post, tk, max_blocks, E=num_experts,
                                 BLOCK_M=block_m, BLOCK_P=block_p, BLOCK_E=triton.next_power_of_2(num_experts + 1),
                                 BLOCK_B=block_b, SHIFT=max(1, block_p.bit_length() - 1), num_warps=8)
        return sorted_ids, expert_ids, num_post
    work = torch.zeros(2 * num_experts + 1, dtype=torch.int32, device=dev)
    counts, cursor, num_post = work[:num_experts], work[num_experts:2 * num_experts], work[2 * num_experts:]
    block_p = 1024
    grid = (triton.cdiv(tk, block_p),)
    _align_count_kernel[grid](flat, counts, tk, E=num_experts, BLOCK_P=block_p, num_warps=4)
    _align_offsets_kernel[(1,)](counts, cursor, sorted_ids, expert_ids, num_post, tk, max_blocks, E=num_experts,
                                BLOCK_M=block_m, BLOCK_E=block_e, BLOCK_B=block_b, num_warps=4)
    _align_scatter_kernel[grid](flat, cursor, sorted_ids, tk, E=num_experts, BLOCK_P=block_p, num_warps=4)
    return sorted_ids, expert_ids, num_post


# ----------------------------------------------------------------------------------- GEMMs
@triton.jit
def _tile_ids(pid, num_m, num_n, GROUP_M: tl.constexpr):
    in_group = GROUP_M * num_n
    gid = pid // in_group
    first_m = gid * GROUP_M
    gsz = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % gsz
    pid_n = (pid % in_group) // gsz
    return pid_m, pid_n


@triton.jit
def _silu_mul(acc_g, acc_u, dt: tl.constexpr):
    """silu(gate) * up from the fp32 accumulators, rounded to dt where the oracle rounds (gate, up, silu(gate),
    the product)."""
    g = acc_g.to(dt).to(tl.float32)
    u = acc_u.to(dt).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
    return (act * u).to(dt)


@triton.jit(do_not_specialize=["TK", "num_m"])
def _moe_gate_up_kernel(x_ptr, w_ptr, out_ptr, sorted_ptr, expert_ids_ptr, npost_ptr, delta_ptr, TK, num_m, H, N,
                        stride_xt, stride_we, stride_wn, stride_ot, stride_dt,
                        TOPK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr, INTERP: tl.constexpr,
                        HAS_DELTA: tl.constexpr):
    """out[slot, n] = silu(x[tok] . w[e, n]) * (x[tok] . w[e, N + n]) for the block's slots. HAS_DELTA: each
    pair's row of delta [T*K, 2N] (fp32: LoRA's gate and up) is added to the two sums first."""
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = _tile_ids(tl.program_id(0), num_m, num_n, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(npost_ptr):
        return
    e = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ptr + offs_m)
    valid = pair < TK
    tok = (pair // TOPK).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_nc = tl.where(offs_n < N, offs_n, 0)  # clamp: rows past N are computed and dropped
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tok[:, None] * stride_xt + offs_k[None, :]
    g_ptrs = w_ptr + e * stride_we + offs_nc[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    u_ptrs = g_ptrs + N * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(H, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=valid[:, None], other=0.0)
            bg = tl.load(g_ptrs)
            bu = tl.load(u_ptrs)
        else:
            kmask = offs_k < H - kb * BLOCK_K
            a = tl.load(a_ptrs, mask=valid[:, None] & kmask[None, :], other=0.0)
            bg = tl.load(g_ptrs, mask=kmask[:, None], other=0.0)
            bu = tl.load(u_ptrs, mask=kmask[:, None], other=0.0)
        acc_g = mma(a, bg, acc_g, IEEE, INTERP)
        acc_u = mma(a, bu, acc_u, IEEE, INTERP)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    if HAS_DELTA:
        d_ptrs = delta_ptr + pair[:, None].to(tl.int64) * stride_dt + offs_n[None, :]
        dmask = valid[:, None] & (offs_n[None, :] < N)
        acc_g += tl.load(d_ptrs, mask=dmask, other=0.0)
        acc_u += tl.load(d_ptrs + N, mask=dmask, other=0.0)
    o_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_ot + offs_n[None, :]
    tl.store(o_ptrs, _silu_mul(acc_g, acc_u, out_ptr.dtype.element_ty), mask=offs_n[None, :] < N)


@triton.jit(do_not_specialize=["TK", "num_m"])
def _moe_down_kernel(a_ptr, w_ptr, out_ptr, sorted_ptr, expert_ids_ptr, npost_ptr, TK, num_m, Kdim, N,
                     stride_at, stride_we, stride_wn, stride_ot,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr, INTERP: tl.constexpr):
    """out[pair, n] = inter[slot] . w2[e, n] for the block's slots (rows of padding slots dropped)."""
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = _tile_ids(tl.program_id(0), num_m, num_n, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(npost_ptr):
        return
    e = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ptr + offs_m)
    valid = pair < TK
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_nc = tl.where(offs_n < N, offs_n, 0)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_at + offs_k[None, :]
    b_ptrs = w_ptr + e * stride_we + offs_nc[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(Kdim, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=valid[:, None], other=0.0)
            b = tl.load(b_ptrs)
        else:
            kmask = offs_k < Kdim - kb * BLOCK_K
            a = tl.load(a_ptrs, mask=valid[:, None] & kmask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=kmask[:, None], other=0.0)
        acc = mma(a, b, acc, IEEE, INTERP)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    o_ptrs = out_ptr + pair[:, None].to(tl.int64) * stride_ot + offs_n[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & (offs_n[None, :] < N))


@triton.jit
def _moe_combine_kernel(pair_ptr, w_ptr, ids_ptr, out_ptr, N, stride_pt, stride_wt, stride_ot,
                        TOPK: tl.constexpr, BLOCK_N: tl.constexpr):
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k in tl.static_range(TOPK):
        e = tl.load(ids_ptr + t * TOPK + k)
        w = tl.load(w_ptr + t * stride_wt + k).to(tl.float32)
        y = tl.load(pair_ptr + (t * TOPK + k).to(tl.int64) * stride_pt + offs, mask=nmask & (e >= 0), other=0.0)
        acc += tl.where(e >= 0, w, 0.0) * y.to(tl.float32)
    tl.store(out_ptr + t.to(tl.int64) * stride_ot + offs, acc.to(out_ptr.dtype.element_ty), mask=nmask)


# ----------------------------------------------------------------------------------- one token
# At one token (decode at batch 1) each expert is a matrix-vector product: tensor-core tiles would leave
# 15 of 16 rows idle, and their K loop keeps only a few stages of loads in flight. Here a program loads its
# BLOCK_N weight rows whole, every load in flight at once, and reduces them in fp32: 3.0 TB/s for the
# gate/up and 2.8 for the down on an H100 against 2.8 and 2.6 for the tiles (same call,
# benchmarks/results/h100_2026-11-26f/expert_gemv.json). The shared expert's gate/up, streamed beside the
# router, keeps the tiles (SHARED_BLOCK_N x SHARED_BLOCK_K, 3 stages): see `_shared_gate_up_tile`.
ONE_TOKEN = {"BLOCK_N": 2, "num_warps": 4, "SHARED_BLOCK_N": 32, "SHARED_BLOCK_K": 128}


@triton.jit
def _gate_up_rows(w_ptr, e, n, nmask, h, hmask, N, stride_we, stride_wn):
    """Expert e's gate rows n and up rows N + n, whole: ([BLOCK_N, BLOCK_H], [BLOCK_N, BLOCK_H])."""
    base = w_ptr + e * stride_we + h[None, :]
    m = nmask[:, None] & hmask[None, :]
    g = tl.load(base + n[:, None].to(tl.int64) * stride_wn, mask=m, other=0.0)
    u = tl.load(base + (N + n)[:, None].to(tl.int64) * stride_wn, mask=m, other=0.0)
    return g, u


@triton.jit
def _shared_gate_up_tile(h_ptr, r_ptr, nw_ptr, w_ptr, out_ptr, e, col, pid_n, H, N, eps, stride_we, stride_wn,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr, INTERP: tl.constexpr):
    """Columns pid_n * BLOCK_N.. of silu(x . gate_e) * (x . up_e) into row col of out, x = rms_norm(h + r) * nw
    (rounded as add_rms_norm rounds it) computed here; in tensor-core tiles (16 rows, the first one real)
    with a pipelined K loop: a moderate stream that leaves the router running beside it its memory latency
    (as whole-row GEMV loads it slowed the router by 2.5 us a layer)."""
    dt = out_ptr.dtype.element_ty
    offs_k = tl.arange(0, BLOCK_K)
    rstd = row_rstd(h_ptr, r_ptr, H, eps, BLOCK_K)
    rows = tl.arange(0, 16)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_nc = tl.where(offs_n < N, offs_n, 0)
    g_ptrs = w_ptr + e * stride_we + offs_nc[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    u_ptrs = g_ptrs + N * stride_wn
    acc_g = tl.zeros((16, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((16, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        km = k0 + offs_k < H
        xn = normed_chunk(h_ptr, r_ptr, nw_ptr, k0 + offs_k, km, rstd)
        a = tl.where(rows[:, None] == 0, xn[None, :], tl.zeros((16, BLOCK_K), dtype=dt))
        bg = tl.load(g_ptrs, mask=km[:, None], other=0.0)
        bu = tl.load(u_ptrs, mask=km[:, None], other=0.0)
        acc_g = mma(a, bg, acc_g, IEEE, INTERP)
        acc_u = mma(a, bu, acc_u, IEEE, INTERP)
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    o_ptrs = out_ptr + col * N + rows[:, None] * 0 + offs_n[None, :]
    tl.store(o_ptrs, _silu_mul(acc_g, acc_u, dt), mask=(rows[:, None] == 0) & (offs_n[None, :] < N))


@triton.jit
def _gate_up_one_token_kernel(x_ptr, h_ptr, r_ptr, nw_ptr, w_ptr, out_ptr, ids_ptr, H, N, eps, stride_we, stride_wn,
                              K_ROUTED: tl.constexpr, N_APP: tl.constexpr, E_SHARED: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, SHARED_BLOCK_N: tl.constexpr,
                              SHARED_BLOCK_K: tl.constexpr, IEEE: tl.constexpr, INTERP: tl.constexpr,
                              PDL: tl.constexpr):
    """inter[k, n] = silu(x . gate_e[n]) * (x . up_e[n]) for column k of ids (e = ids[k]; -1: skipped),
    inter [K, N] contiguous. N_APP > 0: launched right behind the router (PDL), which releases it at its
    start. The first programs compute the appended columns K_ROUTED.. (the folded shared expert, experts
    E_SHARED.., taken by every token): they need nothing from the router, norm the row themselves and
    stream their weights while the router runs (`_shared_gate_up_tile`). The routed columns' programs
    wait for the router, then read its normed row x and its expert ids, and load their BLOCK_N gate and up
    rows whole. Every program waits before it ends, so the kernels after this one find the router done."""
    pid = tl.program_id(0)
    shared_n = tl.cdiv(N, SHARED_BLOCK_N)
    if pid < N_APP * shared_n:
        blk = pid // shared_n
        _shared_gate_up_tile(h_ptr, r_ptr, nw_ptr, w_ptr, out_ptr, (E_SHARED + blk).to(tl.int64), K_ROUTED + blk,
                             pid % shared_n, H, N, eps, stride_we, stride_wn, SHARED_BLOCK_N, SHARED_BLOCK_K, IEEE,
                             INTERP)
    else:
        p = pid - N_APP * shared_n
        num_n = tl.cdiv(N, BLOCK_N)
        col = p // num_n
        wait_for_previous(PDL)
        e = tl.load(ids_ptr + col).to(tl.int64)
        if e >= 0:
            n = (p % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
            h = tl.arange(0, BLOCK_H)
            nmask, hmask = n < N, h < H
            g, u = _gate_up_rows(w_ptr, e, n, nmask, h, hmask, N, stride_we, stride_wn)
            x = tl.load(x_ptr + h, mask=hmask, other=0.0).to(tl.float32)
            y = _silu_mul(tl.sum(g.to(tl.float32) * x[None, :], axis=1), tl.sum(u.to(tl.float32) * x[None, :], axis=1),
                          out_ptr.dtype.element_ty)
            tl.store(out_ptr + col * N + n, y, mask=nmask)
    wait_for_previous(PDL)


@triton.jit
def _down_one_token_kernel(a_ptr, w_ptr, out_ptr, ids_ptr, N, stride_at, stride_we, stride_wn, stride_ot,
                           INTER: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr):
    """out[k, n] = inter[k] . w2[ids[k], n] (rows of ids -1 not written); the rows in chunks of BLOCK_I."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    col = pid // num_n
    e = tl.load(ids_ptr + col).to(tl.int64)
    if e >= 0:
        n = (pid % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < N
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for i0 in tl.static_range(0, INTER, BLOCK_I):
            i = i0 + tl.arange(0, BLOCK_I)
            imask = i < INTER
            w = tl.load(w_ptr + e * stride_we + n[:, None].to(tl.int64) * stride_wn + i[None, :],
                        mask=nmask[:, None] & imask[None, :], other=0.0)
            a = tl.load(a_ptr + col * stride_at + i, mask=imask, other=0.0).to(tl.float32)
            acc += tl.sum(w.to(tl.float32) * a[None, :], axis=1)
        tl.store(out_ptr + col * stride_ot + n, acc.to(out_ptr.dtype.element_ty), mask=nmask)


def _gate_up_one_token(x, w13, ids, norm=None, pdl: bool = False, inter=None):
    """inter [K, I]: row k = silu(x @ gate_{ids[k]}^T) * (x @ up_{ids[k]}^T) (rows of ids -1 undefined).
    norm = (h, residual, norm_weight, eps, n_app): the last n_app columns are the folded shared expert
    (the last n_app experts), normed from h + residual in-kernel; launched behind the router with PDL."""
    k = ids.numel()
    e, two_i, hidden = w13.shape
    n = two_i // 2
    if inter is None:
        inter = torch.empty(k, n, dtype=x.dtype, device=x.device)
    assert inter.is_contiguous()
    h, r, nw, eps, n_app = norm if norm is not None else (x, x, x, 0.0, 0)
    bn, sbn, sbk = ONE_TOKEN["BLOCK_N"], ONE_TOKEN["SHARED_BLOCK_N"], ONE_TOKEN["SHARED_BLOCK_K"]
    grid = n_app * triton.cdiv(n, sbn) + (k - n_app) * triton.cdiv(n, bn)
    _gate_up_one_token_kernel[(grid,)](
        x, h, r, nw, w13, inter, ids, hidden, n, eps, w13.stride(0), w13.stride(1), K_ROUTED=k - n_app, N_APP=n_app,
        E_SHARED=e - n_app, BLOCK_N=bn, BLOCK_H=triton.next_power_of_2(hidden), SHARED_BLOCK_N=sbn,
        SHARED_BLOCK_K=sbk, IEEE=x.dtype == torch.float32, INTERP=INTERPRET, PDL=pdl,
        num_warps=ONE_TOKEN["num_warps"], num_stages=3, **pdl_launch(pdl))
    return inter


def _down_one_token(inter, w2, ids) -> torch.Tensor:
    k = ids.numel()
    hidden, inter_size = w2.shape[1], w2.shape[2]
    pair_out = torch.empty(k, hidden, dtype=inter.dtype, device=inter.device)
    bn = ONE_TOKEN["BLOCK_N"]
    _down_one_token_kernel[(k * triton.cdiv(hidden, bn),)](
        inter, w2, pair_out, ids, hidden, inter.stride(0), w2.stride(0), w2.stride(1), pair_out.stride(0),
        INTER=inter_size, BLOCK_N=bn, BLOCK_I=min(2048, triton.next_power_of_2(inter_size)),
        num_warps=ONE_TOKEN["num_warps"])
    return pair_out


# ----------------------------------------------------------------------------------- entry
def _gemm_grid(num_m, n, block_n):
    return (num_m * triton.cdiv(n, block_n),)


def gate_up(x, w13, align, topk: int, block_m: int, g1: dict, delta=None) -> torch.Tensor:
    """inter [slots, I] = silu(x[tok] @ gate^T + d_gate) * (x[tok] @ up^T + d_up), by expert-aligned slot block;
    delta [T*K, 2I] fp32 by pair (LoRA; None: no d)."""
    sorted_ids, expert_ids, num_post = align
    inter_size, hidden = w13.shape[1] // 2, x.shape[1]
    num_m = expert_ids.shape[0]
    inter = torch.empty(sorted_ids.shape[0], inter_size, dtype=x.dtype, device=x.device)
    _moe_gate_up_kernel[_gemm_grid(num_m, inter_size, g1["BLOCK_N"])](
        x, w13, inter, sorted_ids, expert_ids, num_post, x if delta is None else delta, x.shape[0] * topk, num_m,
        hidden, inter_size, x.stride(0), w13.stride(0), w13.stride(1), inter.stride(0),
        0 if delta is None else delta.stride(0),
        TOPK=topk, BLOCK_M=block_m, BLOCK_N=g1["BLOCK_N"], BLOCK_K=g1["BLOCK_K"], GROUP_M=g1["GROUP_M"],
        EVEN_K=hidden % g1["BLOCK_K"] == 0, IEEE=x.dtype == torch.float32, INTERP=INTERPRET,
        HAS_DELTA=delta is not None, num_warps=g1["num_warps"], num_stages=g1["num_stages"])
    return inter


def down(inter, w2, align, tk: int, block_m: int, g2: dict) -> torch.Tensor:
    """pair_out [T*K, H] = inter[slot] @ w2[e]^T, stored at each slot's (token, k) pair."""
    sorted_ids, expert_ids, num_post = align
    hidden, inter_size = w2.shape[1], w2.shape[2]
    num_m = expert_ids.shape[0]
    pair_out = torch.empty(tk, hidden, dtype=inter.dtype, device=inter.device)
    _moe_down_kernel[_gemm_grid(num_m, hidden, g2["BLOCK_N"])](
        inter, w2, pair_out, sorted_ids, expert_ids, num_post, tk, num_m, inter_size, hidden,
        inter.stride(0), w2.stride(0), w2.stride(1), pair_out.stride(0),
        BLOCK_M=block_m, BLOCK_N=g2["BLOCK_N"], BLOCK_K=g2["BLOCK_K"], GROUP_M=g2["GROUP_M"],
        EVEN_K=inter_size % g2["BLOCK_K"] == 0, IEEE=inter.dtype == torch.float32, INTERP=INTERPRET,
        num_warps=g2["num_warps"], num_stages=g2["num_stages"])
    return pair_out


def combine(pair_out, weights, ids, out) -> torch.Tensor:
    """out[t] = sum_k weights[t, k] * pair_out[t * K + k] (fp32), skipping ids of -1. (weights may be one
    row expanded over the tokens: stride 0.)"""
    t, hidden = out.shape
    block_n = min(1024, triton.next_power_of_2(hidden))
    _moe_combine_kernel[(t, triton.cdiv(hidden, block_n))](
        pair_out, weights, ids, out, hidden, pair_out.stride(0), weights.stride(0), out.stride(0), TOPK=ids.shape[1],
        BLOCK_N=block_n,
        num_warps=4)
    return out


class StartedGateUp(NamedTuple):
    """The gate/up GEMM of one token, launched behind the router (`add_rms_norm_gate_route_gate_up`):
    `moe_experts(..., started=)` goes on from its output."""

    inter: torch.Tensor  # [K, I]: row k is column k's silu(gate) * up
    keep: tuple  # tensors the router may still use while the gate/up runs: held until the next launch


def add_rms_norm_gate_route_gate_up(x, residual, norm_weight, eps: float, gate_weight, expert_bias, top_k: int,
                                    w13, choice=None, overlap: bool | None = None, gate_up=None, **kw):
    """routing.add_rms_norm_gate_route, then, at one token with the shared expert folded in (the last
    num_appended experts of w13, taken by every token), the experts' gate/up GEMM launched behind the
    router with PDL (`_gate_up_one_token_kernel`): the shared expert's quarter of the layer's gate/up
    bytes streams while the router works through its chain of short dependent steps. choice: (weights,
    ids) that replace the router's (benchmarks' uniform routing; the router still runs). Returns (normed,
    residual', weights, ids, StartedGateUp or None). overlap (default: where PDL is; elsewhere nothing
    is gained): the tests force it. gate_up(normed, w13, ids, norm, pdl, inter): the launch for experts w13 that
    are not a bf16/fp32 tensor (quantized: quant.gate_up_one_token), in the place of `_gate_up_one_token`."""
    n_app = kw.get("num_appended", 0)
    e, two_i, hidden = w13.shape
    pdl = pdl_flag(x)
    overlap = pdl if overlap is None else overlap
    gate_up = gate_up or (_gate_up_one_token if x.dtype == w13.dtype else None)
    if not (x.shape[0] == 1 and n_app > 0 and overlap and routing.fused_norm_route(x, residual, gate_weight)
            and gate_up is not None and x.stride(-1) == 1 and residual.stride(-1) == 1):
        out = routing.add_rms_norm_gate_route(x, residual, norm_weight, eps, gate_weight, expert_bias, top_k, **kw)
        return (*out[:2], *(choice or out[2:]), None)
    k_total = top_k + n_app
    # made before the router's launch: memory the router still uses cannot be handed out for it
    inter = torch.empty(k_total, two_i // 2, dtype=x.dtype, device=x.device)

    def launch(normed, ids, keep):
        if choice is not None:
            ids = choice[1]
        assert ids.is_contiguous() and ids.numel() == k_total
        gate_up(normed, w13, ids, (x, residual, norm_weight, eps, n_app), pdl, inter)
        return StartedGateUp(inter, (*keep, x, residual, norm_weight, ids))

    normed, res, weights, ids, started = routing.add_rms_norm_gate_route(
        x, residual, norm_weight, eps, gate_weight, expert_bias, top_k, after=launch, **kw)
    return (normed, res, *(choice or (weights, ids)), started)


def moe_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                config: dict | None = None, unsummed: bool = False, started: StartedGateUp | None = None,
                gate_up_delta: torch.Tensor | None = None, down_lora=None) -> torch.Tensor:
    """sum_k weights[t, k] * Expert_{ids[t, k]}(x[t]); ids -1 contribute nothing. See the module doc.
    config: block sizes of the tiled GEMMs (default: the tuned table; one token takes the GEMVs, no config).
    unsummed: stop before the combine and return each (token, k) pair's output [T*K, H] (rows of ids -1
    undefined), for a later kernel to sum (norm.expert_sum_add_rms_norm). started: one token whose
    gate/up already launched behind the router (`add_rms_norm_gate_route_gate_up`). LoRA (triton/lora.py):
    gate_up_delta [T*K, 2I] fp32 is added to each pair's gate and up before the activation, and
    down_lora(inter by pair [T*K, I], pair_out) adds to the pairs' outputs before the combine."""
    t, hidden = x.shape
    topk = ids.shape[1]
    e, two_i, _ = w13.shape
    if t == 0:
        return torch.empty(t * topk if unsummed else t, hidden, dtype=x.dtype, device=x.device)
    if x.stride(-1) != 1:
        x = x.contiguous()
    w13 = w13 if w13.stride(-1) == 1 else w13.contiguous()
    w2 = w2 if w2.stride(-1) == 1 else w2.contiguous()
    ids = ids.contiguous()
    if weights.stride(-1) != 1:
        weights = weights.contiguous()
    lora = gate_up_delta is not None or down_lora is not None
    if t == 1 and not lora:  # matrix-vector products (see ONE_TOKEN)
        inter = started.inter if started is not None else _gate_up_one_token(x, w13, ids)
        pair_out = _down_one_token(inter, w2, ids)
    else:
        cfg = config or get_config(t, e, hidden, two_i // 2, topk, x.dtype)
        bm = cfg["BLOCK_M"]
        align = moe_align(ids, e, bm)
        inter = gate_up(x, w13, align, topk, bm, cfg["gate_up"], gate_up_delta)
        pair_out = down(inter, w2, align, t * topk, bm, cfg["down"])
        if down_lora is not None:  # inter's rows by pair (padding slots, and those past num_post, on an extra row)
            sorted_ids, _, num_post = align
            used = torch.arange(sorted_ids.numel(), device=x.device) < num_post
            pair = torch.where(used, sorted_ids.long().clamp(0, t * topk), t * topk)
            by_pair = torch.empty(t * topk + 1, inter.shape[1], dtype=inter.dtype, device=inter.device)
            by_pair.index_copy_(0, pair, inter)
            down_lora(by_pair[: t * topk], pair_out)
    if unsummed:
        return pair_out
    return combine(pair_out, weights, ids, torch.empty(t, hidden, dtype=x.dtype, device=x.device))
