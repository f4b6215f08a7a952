"""RMSNorm, fused residual add + RMSNorm, and per-head QK-norm fused with NeoX RoPE, in Triton.

Oracles: `param2moe.kernels.norm.rms_norm / add_rms_norm`, `param2moe.kernels.rope.apply_rope /
qk_norm_rope`. The math is fp32; the roundings to the activation dtype sit where the oracles have them
(the residual sum is rounded before it is normed; q and k are rounded after the norm, before RoPE).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import pdl_flag, release_dependents


@triton.jit(do_not_specialize=["M"])
def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, res_out_ptr, M, N, stride_x, stride_r, stride_o, stride_ro,
                     eps, HAS_RES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr):
    release_dependents(PDL)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(r_ptr + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
        s = (x.to(tl.float32) + r.to(tl.float32)).to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + rows[:, None] * stride_ro + cols[None, :], s, mask=mask)
        x32 = s.to(tl.float32)
    else:
        x32 = x.to(tl.float32)
    var = tl.sum(x32 * x32, axis=1) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    y = x32 * rstd[:, None] * w[None, :]
    tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _residual_chunk(h_ptr, r_ptr, k, m):
    """(h + r)[k] (0 where not m) rounded to h's dtype as add_rms_norm rounds the new residual, in fp32."""
    return (tl.load(h_ptr + k, mask=m, other=0.0).to(tl.float32)
            + tl.load(r_ptr + k, mask=m, other=0.0).to(tl.float32)).to(h_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def row_rstd(h_ptr, r_ptr, H, eps, BLOCK: tl.constexpr):
    """1 / rms of one row h + r of H values (rounded as add_rms_norm rounds it), in chunks of BLOCK: for
    kernels that norm the row themselves instead of waiting for the kernel that does (the one-token MoE's
    shared expert, launched behind the router)."""
    offs = tl.arange(0, BLOCK)
    ss = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, H, BLOCK):
        s = _residual_chunk(h_ptr, r_ptr, k0 + offs, k0 + offs < H)
        ss += s * s
    return 1.0 / tl.sqrt(tl.sum(ss, axis=0) / H + eps)


@triton.jit
def normed_chunk(h_ptr, r_ptr, nw_ptr, k, m, rstd):
    """rms_norm(h + r) * nw at columns k (0 where not m), in h's dtype, as add_rms_norm gives it (rstd:
    `row_rstd`)."""
    s = _residual_chunk(h_ptr, r_ptr, k, m)
    nw = tl.load(nw_ptr + k, mask=m, other=0.0).to(tl.float32)
    return (s * rstd * nw).to(h_ptr.dtype.element_ty)


def _rows(x: torch.Tensor) -> torch.Tensor:
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.dim() == 2:
        return x
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError:
        return x.reshape(-1, x.shape[-1])


def _launch(x2, r2, weight, out2, res2, eps):
    m, n = x2.shape
    block_n = triton.next_power_of_2(n)
    block_m = max(1, min(16, 2048 // block_n))
    warps = 8 if block_n * block_m >= 4096 else 4
    grid = (triton.cdiv(m, block_m),)
    _rms_norm_kernel[grid](
        x2, r2 if r2 is not None else x2, weight, out2, res2 if res2 is not None else out2, m, n,
        x2.stride(0), r2.stride(0) if r2 is not None else 0, out2.stride(0), res2.stride(0) if res2 is not None else 0,
        eps, HAS_RES=r2 is not None, BLOCK_M=block_m, BLOCK_N=block_n, PDL=pdl_flag(x2), num_warps=warps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """w * x / sqrt(mean(x^2) + eps) over the last dim (fp32 math), in x's dtype."""
    x2 = _rows(x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x2, None, weight, out.view(-1, x.shape[-1]), None, eps)
    return out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """residual' = x + residual (rounded to x's dtype); return (rms_norm(residual'), residual')."""
    x2, r2 = _rows(x), _rows(residual)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    res = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device)
    _launch(x2, r2, weight, out.view(-1, x.shape[-1]), res.view(-1, x.shape[-1]), eps)
    return out, res


@triton.jit
def _expert_sum_add_rms_norm_kernel(pair_ptr, w_ptr, ids_ptr, r_ptr, nw_ptr, out_ptr, res_out_ptr, N, stride_p,
                                    stride_w, stride_r, stride_o, stride_ro, eps, TOPK: tl.constexpr,
                                    BLOCK_N: tl.constexpr, PDL: tl.constexpr):
    """Token t: y = sum_k w[t, k] * pair[t * TOPK + k] (fp32, ids < 0 skipped, rounded), then add + RMSNorm."""
    release_dependents(PDL)  # first thing (measured: releasing after the loads is 10 us a step slower)
    t = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    r = tl.load(r_ptr + t * stride_r + cols, mask=mask, other=0.0)
    nw = tl.load(nw_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    for k in tl.static_range(TOPK):  # every load independent of the ids (one round of memory latency)
        e = tl.load(ids_ptr + t * TOPK + k)
        w = tl.load(w_ptr + t * stride_w + k).to(tl.float32)
        y = tl.load(pair_ptr + (t * TOPK + k) * stride_p + cols, mask=mask, other=0.0)
        acc += tl.where(e >= 0, w * y.to(tl.float32), 0.0)  # a skipped pair's row may hold NaN: where, not * 0
    dt = res_out_ptr.dtype.element_ty
    s = (acc.to(pair_ptr.dtype.element_ty).to(tl.float32) + r.to(tl.float32)).to(dt)
    tl.store(res_out_ptr + t * stride_ro + cols, s, mask=mask)
    x32 = s.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x32 * x32, axis=0) / N + eps)
    tl.store(out_ptr + t * stride_o + cols, (x32 * rstd * nw).to(out_ptr.dtype.element_ty), mask=mask)


def expert_sum_add_rms_norm(pair_out: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, residual: torch.Tensor,
                            weight: torch.Tensor, eps: float):
    """add_rms_norm(sum_k weights[t, k] * pair_out[t * K + k], residual): the MoE combine in the norm's launch."""
    t, k = ids.shape
    n = pair_out.shape[1]
    ids = ids.contiguous()
    r2 = _rows(residual)
    out = torch.empty(t, n, dtype=pair_out.dtype, device=pair_out.device)
    res = torch.empty(t, n, dtype=torch.promote_types(pair_out.dtype, residual.dtype), device=pair_out.device)
    if t == 0:
        return out, res
    assert pair_out.stride(-1) == 1 and weights.stride(-1) == 1
    block_n = triton.next_power_of_2(n)
    _expert_sum_add_rms_norm_kernel[(t,)](
        pair_out, weights, ids, r2, weight, out, res, n, pair_out.stride(0), weights.stride(0), r2.stride(0),
        out.stride(0), res.stride(0), eps, TOPK=k, BLOCK_N=block_n, PDL=pdl_flag(r2),
        num_warps=8 if block_n >= 2048 else 4)
    return out, res


# ----------------------------------------------------------------------------- QK-norm + RoPE
@triton.jit
def _norm_rope_heads(x_ptr, stride_xt, stride_xh, w_ptr, cos_ptr, sin_ptr, t, stride_ct, eps,
                     NH: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr, HAS_W: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, OUT_DT: tl.constexpr):
    """Token t's heads of x, normed and rotated: [BLOCK_H, BLOCK_D] fp32 (rounded as the oracle rounds)."""
    h = tl.arange(0, BLOCK_H)
    j = tl.arange(0, BLOCK_D)
    mask = (h[:, None] < NH) & (j[None, :] < D)
    base = x_ptr + t * stride_xt + h[:, None] * stride_xh
    x = tl.load(base + j[None, :], mask=mask, other=0.0).to(tl.float32)
    # Each output column j needs its rotate-half partner p(j) (j + half, j - half, or j itself).
    R: tl.constexpr = 2 * HALF
    p = tl.where(j < HALF, j + HALF, tl.where(j < R, j - HALF, j))
    xp = tl.load(base + p[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_W:
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
        w = tl.load(w_ptr + j, mask=j < D, other=0.0).to(tl.float32)
        wp = tl.load(w_ptr + p, mask=j < D, other=0.0).to(tl.float32)
        # The oracle rounds the normed q/k to the activation dtype before RoPE.
        x = (x * rstd[:, None] * w[None, :]).to(OUT_DT).to(tl.float32)
        xp = (xp * rstd[:, None] * wp[None, :]).to(OUT_DT).to(tl.float32)
    c_idx = tl.where(j < HALF, j, j - HALF)
    rot = j < R
    c = tl.load(cos_ptr + t * stride_ct + c_idx, mask=rot, other=1.0)
    s = tl.load(sin_ptr + t * stride_ct + c_idx, mask=rot, other=0.0)
    sign = tl.where(j < HALF, -1.0, 1.0)
    return tl.where(rot[None, :], x * c[None, :] + sign[None, :] * xp * s[None, :], x)


@triton.jit
def _qk_norm_rope_kernel(q_ptr, sq_t, sq_h, k_ptr, sk_t, sk_h, qo_ptr, ko_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr,
                         stride_ct, eps, v_ptr, sv_t, sv_h, kc_ptr, vc_ptr, slot_ptr, skc_s, skc_h, svc_s, svc_h,
                         NQ: tl.constexpr, NK: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
                         HAS_W: tl.constexpr, WRITE_KV: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    """Program (t, 0): token t's query heads; (t, 1): its key heads, and with WRITE_KV its k and v into
    the paged cache at slot_mapping[t] (skipped when < 0)."""
    t = tl.program_id(0)
    dt = qo_ptr.dtype.element_ty
    j = tl.arange(0, BLOCK_D)
    if tl.program_id(1) == 0:
        yq = _norm_rope_heads(q_ptr, sq_t, sq_h, qw_ptr, cos_ptr, sin_ptr, t, stride_ct, eps,
                              NQ, D, HALF, HAS_W, BLOCK_Q, BLOCK_D, dt)
        hq = tl.arange(0, BLOCK_Q)
        tl.store(qo_ptr + t * NQ * D + hq[:, None] * D + j[None, :], yq.to(dt),
                 mask=(hq[:, None] < NQ) & (j[None, :] < D))
    else:
        yk = _norm_rope_heads(k_ptr, sk_t, sk_h, kw_ptr, cos_ptr, sin_ptr, t, stride_ct, eps,
                              NK, D, HALF, HAS_W, BLOCK_K, BLOCK_D, dt)
        hk = tl.arange(0, BLOCK_K)
        mask = (hk[:, None] < NK) & (j[None, :] < D)
        tl.store(ko_ptr + t * NK * D + hk[:, None] * D + j[None, :], yk.to(dt), mask=mask)
        if WRITE_KV:
            slot = tl.load(slot_ptr + t).to(tl.int64)
            if slot >= 0:
                tl.store(kc_ptr + slot * skc_s + hk[:, None] * skc_h + j[None, :], yk.to(dt), mask=mask)
                v = tl.load(v_ptr + t * sv_t + hk[:, None] * sv_h + j[None, :], mask=mask)
                tl.store(vc_ptr + slot * svc_s + hk[:, None] * svc_h + j[None, :], v, mask=mask)


def _heads(x):
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None,
                 cos: torch.Tensor, sin: torch.Tensor, eps: float, kv_write=None):
    """Per-head RMSNorm of q [T, NH, D] and k [T, NKV, D] (skipped when the weights are None), then NeoX
    RoPE over the first 2 * cos.shape[-1] dims; with kv_write = (v, k_cache, v_cache, slot_mapping) the
    new k and v also go to the paged cache. One launch for all. Returns new contiguous (q, k)."""
    q, k = _heads(q), _heads(k)
    t, nq, d = q.shape
    nk = k.shape[1]
    half = cos.shape[-1]
    cos, sin = cos.float(), sin.float()
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ko = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if t == 0:
        return qo, ko
    has_w = q_weight is not None
    if kv_write is not None:
        v, k_cache, v_cache, slots = kv_write
        v = _heads(v)
        kc, vc = k_cache.view(-1, *k_cache.shape[2:]), v_cache.view(-1, *v_cache.shape[2:])
        assert kc.stride(-1) == 1 and vc.stride(-1) == 1 and v.dtype == kc.dtype == k.dtype
        kv_args = (v, v.stride(0), v.stride(1), kc, vc, slots, kc.stride(0), kc.stride(1), vc.stride(0), vc.stride(1))
    else:
        kv_args = (k, 0, 0, k, k, k, 0, 0, 0, 0)
    _qk_norm_rope_kernel[(t, 2)](
        q, q.stride(0), q.stride(1), k, k.stride(0), k.stride(1), qo, ko,
        q_weight if has_w else q, k_weight if has_w else k, cos, sin, cos.stride(0), eps, *kv_args,
        NQ=nq, NK=nk, D=d, HALF=half, HAS_W=has_w, WRITE_KV=kv_write is not None,
        BLOCK_Q=triton.next_power_of_2(nq), BLOCK_K=triton.next_power_of_2(nk), BLOCK_D=triton.next_power_of_2(d),
        num_warps=4)
    return qo, ko


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX rotate-half over the first 2*cos.shape[-1] dims of each head of x [T, heads, D]."""
    x = _heads(x)
    t, nh, d = x.shape
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if t == 0:
        return out
    _qk_norm_rope_kernel[(t, 1)](
        x, x.stride(0), x.stride(1), x, x.stride(0), x.stride(1), out, out, x, x, cos, sin, cos.stride(0), 0.0,
        x, 0, 0, x, x, x, 0, 0, 0, 0,
        NQ=nh, NK=nh, D=d, HALF=cos.shape[-1], HAS_W=False, WRITE_KV=False, BLOCK_Q=triton.next_power_of_2(nh),
        BLOCK_K=triton.next_power_of_2(nh), BLOCK_D=triton.next_power_of_2(d), num_warps=4)
    return out
