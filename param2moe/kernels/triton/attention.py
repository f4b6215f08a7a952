"""Paged attention in Triton. Oracle: `param2moe.kernels.attention.paged_attention`. (QK-norm + RoPE and the
KV-cache write run before it in one launch, norm.py, or, at decode with a split walk, inside it: `new_kv`.)

One kernel serves decode, prefill and chunked prefill over the paged cache [num_blocks, 16, NKV, D]:
- a program takes BLOCK_Q query tokens of one sequence and ALL the query heads of one KV head (GQA:
  rows of the Q tile are (token, head-in-group) pairs), so each K/V tile is read once for the group;
- it walks the sequence's KV in BLOCK_N-token tiles through the block table, causal with bottom-right
  alignment (query i of a sequence sits at position context_len - query_len + i), online softmax in fp32
  (exp2 domain);
- with few programs and a long context the KV walk is split NUM_SPLITS ways (third grid axis); each
  split writes its partial output and (max, sum) to fp32 scratch and a second kernel combines them.
The grid's first axis is T // BLOCK_Q + B (a sequence's q-blocks start at q_start // BLOCK_Q + b, found by
binary search), so the grid depends on shapes and host ints only: CUDA-graph capturable. The split
count depends on (T, B, max_context_len), fixed for a captured graph (max_context_len = max_model_len);
each split sizes its share of the walk from the device-side context length.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, mma, pdl_flag, pdl_launch, release_dependents, wait_for_previous
from .norm import _norm_rope_heads, qk_norm_rope

LOG2E = 1.4426950408889634


@triton.jit(do_not_specialize=["B"])
def _paged_attn_kernel(q_ptr, k_ptr, v_ptr, o_ptr, po_ptr, pml_ptr, bt_ptr, ctx_ptr, qsl_ptr, B, qk_scale,
                       stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                       stride_ot, stride_oh, stride_bt,
                       NH: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                       PAGE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       NUM_SPLITS: tl.constexpr, DECODE: tl.constexpr, IEEE: tl.constexpr,
                       INTERP: tl.constexpr,
                       kn_ptr, vn_ptr, slot_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, stride_knt, stride_knh,
                       stride_vnt, stride_vnh, stride_ct, eps, NORM_ROPE: tl.constexpr, HAS_W: tl.constexpr,
                       HALF: tl.constexpr, PDL: tl.constexpr, bt_cols, SPECULATE: tl.constexpr):
    release_dependents(PDL)
    pid_q = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    if DECODE:  # one query a sequence: program = sequence
        b = pid_q
        qblk = 0
        if SPECULATE:  # the pages of tile `split` read first, in parallel with the context length (the walk gives
            # split s tile s whenever the context has at most NUM_SPLITS tiles; else they are read again below)
            js = split * BLOCK_N + tl.arange(0, BLOCK_N)
            page_s = tl.load(bt_ptr + b * stride_bt + js // PAGE, mask=js // PAGE < bt_cols, other=0).to(tl.int64)
    else:
        lo = B * 0  # a tensor from the start: the loop carries it
        hi = B - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            first = tl.load(qsl_ptr + mid).to(tl.int32) // BLOCK_Q + mid
            if first <= pid_q:
                lo = mid
            else:
                hi = mid - 1
        b = lo
        qblk = pid_q - (tl.load(qsl_ptr + b).to(tl.int32) // BLOCK_Q + b)
    if SPECULATE:  # one query a sequence: sequence b's is row b (no round trip through query_start_loc)
        q_start = b
        q_len = b * 0 + 1
    else:
        q_start = tl.load(qsl_ptr + b).to(tl.int32)
        q_len = tl.load(qsl_ptr + b + 1).to(tl.int32) - q_start
        if qblk * BLOCK_Q >= q_len:
            return
    ctx = tl.load(ctx_ptr + b).to(tl.int32)

    rows = tl.arange(0, BLOCK_M)
    qi_local = rows // G_PAD
    g = rows % G_PAD
    qi = qblk * BLOCK_Q + qi_local
    row_valid = (qi_local < BLOCK_Q) & (qi < q_len) & (g < G)
    head = kvh * G + g
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    tok = (q_start + qi).to(tl.int64)
    if NORM_ROPE:  # decode: q as projected; this program's G heads normed and rotated here (row r = head r)
        q = _norm_rope_heads(q_ptr + kvh * G * stride_qh, stride_qt, stride_qh, qw_ptr, cos_ptr, sin_ptr,
                             q_start, stride_ct, eps, G, D, HALF, HAS_W, BLOCK_M, BLOCK_D,
                             q_ptr.dtype.element_ty).to(q_ptr.dtype.element_ty)
    else:
        q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                    mask=row_valid[:, None] & dmask[None, :], other=0.0)
    q_pos = ctx - q_len + qi
    last_q = tl.minimum(qblk * BLOCK_Q + BLOCK_Q, q_len) - 1
    kv_end = tl.minimum(ctx, ctx - q_len + last_q + 1)
    n_tiles = tl.cdiv(kv_end, BLOCK_N)
    if NUM_SPLITS > 1:
        per = tl.cdiv(n_tiles, NUM_SPLITS)
        t0 = split * per
        t1 = tl.minimum(t0 + per, n_tiles)
    else:
        t0 = 0
        t1 = n_tiles

    if NORM_ROPE:  # the new token's k (normed, rotated) and v: stored by the program whose share of the walk
        # holds it, and put into its tile from registers (no store-then-load round trip)
        one = tl.arange(0, 2)
        kn2 = _norm_rope_heads(kn_ptr + kvh * stride_knh, stride_knt, stride_knh, kw_ptr, cos_ptr, sin_ptr, q_start,
                               stride_ct, eps, 1, D, HALF, HAS_W, 2, BLOCK_D, k_ptr.dtype.element_ty)
        kn = tl.sum(tl.where(one[:, None] == 0, kn2, 0.0), axis=0).to(k_ptr.dtype.element_ty)  # [BLOCK_D]
        vn = tl.load(vn_ptr + q_start * stride_vnt + kvh * stride_vnh + d, mask=dmask)
        last = (ctx - 1) // BLOCK_N
        slot = tl.load(slot_ptr + q_start).to(tl.int64)
        new_pos = tl.where(slot >= 0, ctx - 1, -1)  # slot -1 (nothing written): the cache as it is
        owner = (last >= t0) & (last < t1) & (slot >= 0)
        tl.store(k_ptr + slot * stride_ks + kvh * stride_kh + d, kn, mask=dmask & owner)
        tl.store(v_ptr + slot * stride_vs + kvh * stride_vh + d, vn, mask=dmask & owner)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    bt_row = bt_ptr + b * stride_bt
    for t in range(t0, t1):
        j = t * BLOCK_N + tl.arange(0, BLOCK_N)
        jmask = j < kv_end
        if SPECULATE:
            page = tl.where(t == split, page_s,
                            tl.load(bt_row + j // PAGE, mask=jmask & (t != split), other=0).to(tl.int64))
        else:
            page = tl.load(bt_row + j // PAGE, mask=jmask, other=0).to(tl.int64)
        k_off = page * stride_kb + (j % PAGE) * stride_ks + kvh * stride_kh
        v_off = page * stride_vb + (j % PAGE) * stride_vs + kvh * stride_vh
        kt = tl.load(k_ptr + k_off[None, :] + d[:, None], mask=jmask[None, :] & dmask[:, None], other=0.0)
        if SPECULATE:  # v in flight with k (one round of memory latency a tile, not two)
            v = tl.load(v_ptr + v_off[:, None] + d[None, :], mask=jmask[:, None] & dmask[None, :], other=0.0)
        if NORM_ROPE:
            kt = tl.where((j == new_pos)[None, :], kn[:, None], kt)
        s = mma(q, kt, tl.zeros((BLOCK_M, BLOCK_N), tl.float32), IEEE, INTERP) * qk_scale
        allowed = (j[None, :] <= q_pos[:, None]) & jmask[None, :]
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if not SPECULATE:
            v = tl.load(v_ptr + v_off[:, None] + d[None, :], mask=jmask[:, None] & dmask[None, :], other=0.0)
        if NORM_ROPE:
            v = tl.where((j == new_pos)[:, None], vn[None, :], v)
        acc = mma(p.to(v.dtype), v, acc * alpha[:, None], IEEE, INTERP)
        m_i = m_new

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    if NUM_SPLITS > 1:
        # scratch [T, NH, S, D] and [T, NH, S, 2]
        base = (tok * NH + head) * NUM_SPLITS + split
        tl.store(po_ptr + base[:, None] * BLOCK_D + d[None, :], out, mask=row_valid[:, None])
        tl.store(pml_ptr + base * 2, m_i, mask=row_valid)
        tl.store(pml_ptr + base * 2 + 1, l_i, mask=row_valid)
    else:
        tl.store(o_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=row_valid[:, None] & dmask[None, :])


@triton.jit
def _split_reduce_kernel(po_ptr, pml_ptr, o_ptr, stride_ot, stride_oh, NH: tl.constexpr, D: tl.constexpr,
                         BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr):
    # Launched to overlap the attention's run (PDL): release the next kernel (the decode GEMV loads its
    # weights meanwhile), then wait for the attention's partial results.
    release_dependents(PDL)
    wait_for_previous(PDL)
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    smask = s < NUM_SPLITS
    base = (t * NH + h) * NUM_SPLITS + s
    m = tl.load(pml_ptr + base * 2, mask=smask, other=float("-inf"))
    lse = tl.load(pml_ptr + base * 2 + 1, mask=smask, other=0.0)
    m_max = tl.max(m, axis=0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_max) * lse  # an empty split has m = -inf, lse = 0: weight 0 (a NaN stays a NaN)
    o = tl.load(po_ptr + base[:, None] * BLOCK_D + d[None, :], mask=smask[:, None], other=0.0)
    total = tl.sum(w, axis=0)
    out = tl.sum(o * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(o_ptr + t * stride_ot + h * stride_oh + d, out.to(o_ptr.dtype.element_ty), mask=d < D)


@functools.cache
def _num_sms(index) -> int:
    if torch.cuda.is_available() and index is not None:
        return torch.cuda.get_device_properties(index).multi_processor_count
    return 4  # the interpreter: small, so the tests exercise the split path


# Block sizes picked by benchmarks/gpu_kernels.py (benchmarks/results/gpu_kernels_notes.md): decode walks
# 128-token KV tiles, or 64-token tiles when the walk is split (more, shorter splits for one long sequence).
DECODE_CFG = {"BLOCK_N": 128, "num_warps": 4, "num_stages": 2}
DECODE_SPLIT_CFG = {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
PREFILL_CFG = {"BLOCK_Q": 16, "BLOCK_N": 128, "num_warps": 4, "num_stages": 2}
MAX_SPLITS = 64
# Decode with a split walk (few sequences: a chain of latencies): sequence b's query row taken as b, the pages of
# the split's first tile read before the context length is known, v loaded beside k: fewer memory round trips one
# after another (docs/quant-kernels.md, benchmarks/results/h100_2026-12-06g/). P2M_ATTN_SPECULATE=0: not (A/B).
DECODE_SPECULATE = os.environ.get("P2M_ATTN_SPECULATE", "1") != "0"


def choose_splits(num_programs: int, max_context_len: int, block_n: int, num_sms: int) -> int:
    """Split the KV walk when the grid would under-fill the GPU: aim at ~4 programs an SM, at most one
    split per KV tile of the longest context."""
    if num_programs >= num_sms:
        return 1
    want = -(-4 * num_sms // num_programs)
    most = max(1, max_context_len // block_n)
    return int(max(1, min(want, most, MAX_SPLITS)))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    context_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float, max_query_len: int,
                    max_context_len: int, num_splits: int | None = None, config: dict | None = None,
                    new_kv=None) -> torch.Tensor:
    """Causal attention of each sequence's new queries q [T, NH, D] over its cached context (the new
    tokens' k/v already written). Same contract as the torch oracle; `num_splits` / `config` override the
    heuristics (tests, tuning). new_kv = (k, v, slot_mapping, q_weight, k_weight, cos, sin, eps): q and k
    as projected; QK-norm + RoPE and the cache write of k, v first (see kernels.paged_attention): inside
    this launch at decode with a split walk, else in qk_norm_rope's."""
    t, nh, d = q.shape
    nkv, page = k_cache.shape[2], k_cache.shape[1]
    b = block_tables.shape[0]
    decode = max_query_len == 1 and t == b
    out = torch.empty(t, nh, d, dtype=q.dtype, device=q.device)
    if t == 0 or b == 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    g = nh // nkv
    g_pad = triton.next_power_of_2(g)
    cfg = dict(config or (DECODE_CFG if decode else PREFILL_CFG))
    block_q = 1 if decode else cfg.get("BLOCK_Q", 16)
    n_q = b if decode else t // block_q + b
    if num_splits is None:
        sms = _num_sms(q.device.index if q.is_cuda else None)
        num_splits = choose_splits(n_q * nkv, max_context_len, cfg["BLOCK_N"], sms)
        if num_splits > 1 and decode and config is None:
            cfg = dict(DECODE_SPLIT_CFG)
            num_splits = choose_splits(n_q * nkv, max_context_len, cfg["BLOCK_N"], sms)
    if new_kv is not None and (not decode or num_splits == 1):
        # Fused only where the grid is small (a split walk, few sequences: launches dominate); its extra
        # registers cost the occupancy that a full grid needs (measured: 147 vs 114 a thread; batch 256 2% slower).
        k, v, slots, q_weight, k_weight, cos, sin, eps = new_kv
        q, _ = qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps, (v, k_cache, v_cache, slots))
        new_kv = None
    block_m = max(16, block_q * g_pad)
    block_n = cfg["BLOCK_N"]
    block_d = triton.next_power_of_2(d)
    pdl = pdl_flag(q)
    if num_splits > 1:
        po = torch.empty(t, nh, num_splits, block_d, dtype=torch.float32, device=q.device)
        pml = torch.empty(t, nh, num_splits, 2, dtype=torch.float32, device=q.device)
    else:
        po = pml = out
    _paged_attn_kernel[(n_q, nkv, num_splits)](
        q, k_cache, v_cache, out, po, pml, block_tables, context_lens, query_start_loc, b, scale * LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1), block_tables.stride(0),
        NH=nh, G=g, G_PAD=g_pad, D=d, BLOCK_D=block_d, PAGE=page, BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=block_n,
        NUM_SPLITS=num_splits, DECODE=decode, IEEE=q.dtype == torch.float32, INTERP=INTERPRET,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], PDL=pdl, bt_cols=block_tables.shape[1],
        SPECULATE=DECODE_SPECULATE and decode and num_splits > 1, **_new_kv_args(new_kv, q, k_cache, v_cache))
    if num_splits > 1:
        _split_reduce_kernel[(t, nh)](po, pml, out, out.stride(0), out.stride(1), NH=nh, D=d, BLOCK_D=block_d,
                                      NUM_SPLITS=num_splits, BLOCK_S=triton.next_power_of_2(num_splits), PDL=pdl,
                                      num_warps=2, **pdl_launch(pdl))
    return out


def _new_kv_args(new_kv, q, k_cache, v_cache) -> dict:
    """The kernel's arguments for decode with QK-norm + RoPE + the cache write inside (or none of it)."""
    if new_kv is None:
        return dict(kn_ptr=q, vn_ptr=q, slot_ptr=q, qw_ptr=q, kw_ptr=q, cos_ptr=q, sin_ptr=q, stride_knt=0,
                    stride_knh=0, stride_vnt=0, stride_vnh=0, stride_ct=0, eps=0.0, NORM_ROPE=False, HAS_W=False,
                    HALF=1)
    k, v, slots, q_weight, k_weight, cos, sin, eps = new_kv
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    cos, sin = cos.float(), sin.float()
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    # a slot's row in the cache is slot * stride(1): blocks must be back to back
    assert k_cache.stride(0) == k_cache.shape[1] * k_cache.stride(1)
    assert v_cache.stride(0) == v_cache.shape[1] * v_cache.stride(1)
    assert v.dtype == k_cache.dtype == q.dtype
    has_w = q_weight is not None
    return dict(kn_ptr=k, vn_ptr=v, slot_ptr=slots, qw_ptr=q_weight if has_w else q, kw_ptr=k_weight if has_w else q,
                cos_ptr=cos, sin_ptr=sin, stride_knt=k.stride(0), stride_knh=k.stride(1), stride_vnt=v.stride(0),
                stride_vnh=v.stride(1), stride_ct=cos.stride(0), eps=eps, NORM_ROPE=True, HAS_W=has_w,
                HALF=cos.shape[-1])
