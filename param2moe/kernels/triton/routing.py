"""MoE routing (docs/model.md §3.4) for a whole batch in one Triton launch. Oracle: `param2moe.kernels.routing.route`.

Per token (BLOCK_T tokens a program, all E experts in registers): sigmoid or softmax scores (fp32), choice
scores = scores + expert bias, optional grouped selection (group score = sum of its top-2 choice scores, the
best `topk_group` groups kept, -inf elsewhere), top-K by repeated argmax (ties go to the lower expert
index), weights gathered from the unbiased scores, renormalised, scaled.

`gate_route` adds the router's fp32 logits (oracle: `param2moe.kernels.routing.gate_route`): at decode
sizes in the same launch (programs compute a slice of the experts' logits each; the last one to finish,
found with an atomic counter, routes), beyond that cuBLAS logits and the routing kernel.
`add_rms_norm_gate_route` does the same on rms_norm(x + residual), the norm computed in the same launch.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._common import pdl_flag, release_dependents
from .norm import add_rms_norm


@triton.jit
def _route_rows(logits_ptr, bias_ptr, w_ptr, ids_ptr, T, stride_l, scale, row0,
                E: tl.constexpr, K: tl.constexpr, SOFTMAX: tl.constexpr, HAS_BIAS: tl.constexpr,
                N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, NORM: tl.constexpr, N_APPENDED: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr):
    """Route tokens row0 .. row0 + BLOCK_T - 1 (those < T) from their logits."""
    rows = row0 + tl.arange(0, BLOCK_T)
    e = tl.arange(0, BLOCK_E)
    valid_e = e < E
    rmask = rows < T
    # .cg: read through L2 (the fused kernel reads logits that other programs just wrote)
    x = tl.load(logits_ptr + rows[:, None] * stride_l + e[None, :], mask=rmask[:, None] & valid_e[None, :],
                other=0.0, cache_modifier=".cg").to(tl.float32)
    neg_inf = float("-inf")
    if SOFTMAX:
        x = tl.where(valid_e[None, :], x, neg_inf)
        m = tl.max(x, axis=1)
        p = tl.exp(x - m[:, None])
        p = tl.where(valid_e[None, :], p, 0.0)
        s = p / tl.sum(p, axis=1)[:, None]
    else:
        s = 1.0 / (1.0 + tl.exp(-x))
    c = s
    if HAS_BIAS:
        b = tl.load(bias_ptr + e, mask=valid_e, other=0.0).to(tl.float32)
        c = c + b[None, :]
    c = tl.where(valid_e[None, :], c, neg_inf)
    if N_GROUP > 1:
        GS: tl.constexpr = E // N_GROUP
        grp = e // GS
        gidx = tl.arange(0, BLOCK_G)
        gscore = tl.full((BLOCK_T, BLOCK_G), neg_inf, tl.float32)
        for g in tl.static_range(N_GROUP):
            in_g = (grp == g) & valid_e
            cg = tl.where(in_g[None, :], c, neg_inf)
            best = tl.max(cg, axis=1)
            sc = best
            if GS > 1:
                arg = tl.argmax(cg, axis=1)
                second = tl.max(tl.where(e[None, :] == arg[:, None], neg_inf, cg), axis=1)
                sc = best + second
            gscore = tl.where(gidx[None, :] == g, sc[:, None], gscore)
        keep = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.int1)
        for _ in tl.static_range(TOPK_GROUP):
            gbest = tl.argmax(gscore, axis=1)
            keep = keep | (grp[None, :] == gbest[:, None])
            gscore = tl.where(gidx[None, :] == gbest[:, None], neg_inf, gscore)
        c = tl.where(keep, c, neg_inf)
    kk = tl.arange(0, BLOCK_K)
    ids = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    ws = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    taken = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.int1)
    for i in tl.static_range(K):
        # Best expert not yet taken (a masked-out group's -inf still beats nothing once needed).
        cc = tl.where(taken, neg_inf, c)
        best = tl.max(cc, axis=1)
        hit = (cc == best[:, None]) & (~taken) & valid_e[None, :]
        idx = tl.min(tl.where(hit, e[None, :], BLOCK_E), axis=1)
        sel = e[None, :] == idx[:, None]
        taken = taken | sel
        wi = tl.sum(tl.where(sel, s, 0.0), axis=1)
        ids = tl.where(kk[None, :] == i, idx[:, None], ids)
        ws = tl.where(kk[None, :] == i, wi[:, None], ws)
    if NORM:
        ws = ws / tl.sum(ws, axis=1)[:, None]
    ws = ws * scale
    KO: tl.constexpr = K + N_APPENDED  # experts E.. E+N_APPENDED-1 follow, weight 1 (folded shared expert)
    if N_APPENDED > 0:
        ids = tl.where(kk[None, :] >= K, E + kk[None, :] - K, ids)
        ws = tl.where(kk[None, :] >= K, 1.0, ws)
    omask = rmask[:, None] & (kk[None, :] < KO)
    tl.store(w_ptr + rows[:, None] * KO + kk[None, :], ws, mask=omask)
    tl.store(ids_ptr + rows[:, None] * KO + kk[None, :], ids.to(tl.int64), mask=omask)


@triton.jit(do_not_specialize=["T"])
def _route_kernel(logits_ptr, bias_ptr, w_ptr, ids_ptr, T, stride_l, scale,
                  E: tl.constexpr, K: tl.constexpr, SOFTMAX: tl.constexpr, HAS_BIAS: tl.constexpr,
                  N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, NORM: tl.constexpr, N_APPENDED: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr):
    _route_rows(logits_ptr, bias_ptr, w_ptr, ids_ptr, T, stride_l, scale, tl.program_id(0) * BLOCK_T,
                E, K, SOFTMAX, HAS_BIAS, N_GROUP, TOPK_GROUP, NORM, N_APPENDED, BLOCK_T, BLOCK_E, BLOCK_K, BLOCK_G)


@triton.jit(do_not_specialize=["T"])
def _gate_route_kernel(x_ptr, gate_ptr, logits_ptr, counter_ptr, bias_ptr, w_ptr, ids_ptr, T, H, stride_x, scale,
                       r_ptr, nw_ptr, xn_ptr, res_ptr, stride_r, eps,
                       E: tl.constexpr, K: tl.constexpr, SOFTMAX: tl.constexpr, HAS_BIAS: tl.constexpr,
                       N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, NORM: tl.constexpr,
                       N_APPENDED: tl.constexpr, EXPERTS_PER_PROGRAM: tl.constexpr, BLOCK_H: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr,
                       HAS_NORM: tl.constexpr, WHOLE_ROW: tl.constexpr, PDL: tl.constexpr):
    """Router logits and routing in one launch (decode sizes, T <= BLOCK_T): each program computes the
    fp32 logits of EXPERTS_PER_PROGRAM experts for every token (bf16/fp32 x read as fp32, like
    F.linear(x.float(), gate)); the last program to finish (an atomic counter, reset by it) routes.
    HAS_NORM: x is the attention output; the router's input is rms_norm(x + residual) (rounded as
    add_rms_norm rounds it), which every program computes for itself and program 0 also stores, with
    the new residual, for the experts and the next layer. Launched as usual (its inputs complete), it lets
    a kernel launched after it with PDL start at once (`moe.add_rms_norm_gate_route_gate_up`)."""
    release_dependents(PDL)
    pid = tl.program_id(0)
    t = tl.arange(0, BLOCK_T)
    e = pid * EXPERTS_PER_PROGRAM + tl.arange(0, EXPERTS_PER_PROGRAM)
    h = tl.arange(0, BLOCK_H)
    tmask = t[:, None] < T
    if HAS_NORM and WHOLE_ROW:
        acc = _norm_logits_whole_row(x_ptr, gate_ptr, r_ptr, nw_ptr, xn_ptr, res_ptr, t, e, h, tmask, H, stride_x,
                                     stride_r, eps, pid == 0)
    else:
        acc = _norm_logits(x_ptr, gate_ptr, r_ptr, nw_ptr, xn_ptr, res_ptr, t, e, h, tmask, H, stride_x, stride_r,
                           eps, pid == 0, HAS_NORM, BLOCK_T, EXPERTS_PER_PROGRAM, BLOCK_H)
    tl.store(logits_ptr + t[:, None] * E + e[None, :], acc, mask=tmask)
    tl.debug_barrier()  # every thread's stores issued before the release below
    done = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
    if done == tl.num_programs(0) - 1:
        _route_rows(logits_ptr, bias_ptr, w_ptr, ids_ptr, T, E, scale, 0, E, K, SOFTMAX, HAS_BIAS, N_GROUP,
                    TOPK_GROUP, NORM, N_APPENDED, BLOCK_T, BLOCK_E, BLOCK_K, BLOCK_G)
        tl.atomic_xchg(counter_ptr, 0)


@triton.jit
def _norm_logits_whole_row(x_ptr, gate_ptr, r_ptr, nw_ptr, xn_ptr, res_ptr, t, e, h, tmask, H, stride_x, stride_r,
                           eps, store):
    """`_norm_logits` with HAS_NORM when a row fits one block: x, the residual, the norm's weight and the gate
    rows loaded at once (one memory round trip on the router's chain, not two), the same roundings."""
    dt = x_ptr.dtype.element_ty
    hm = h < H
    m = tmask & hm[None, :]
    wv = tl.load(gate_ptr + e[:, None] * H + h[None, :], mask=hm[None, :], other=0.0)
    nw = tl.load(nw_ptr + h, mask=hm, other=0.0).to(tl.float32)
    xv = tl.load(x_ptr + t[:, None] * stride_x + h[None, :], mask=m, other=0.0).to(tl.float32)
    rv = tl.load(r_ptr + t[:, None] * stride_r + h[None, :], mask=m, other=0.0).to(tl.float32)
    sv = (xv + rv).to(dt)
    svf = sv.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(svf * svf, axis=1) / H + eps)
    xn = (svf * rstd[:, None] * nw[None, :]).to(dt)
    if store:
        tl.store(res_ptr + t[:, None] * H + h[None, :], sv, mask=m)
        tl.store(xn_ptr + t[:, None] * H + h[None, :], xn, mask=m)
    return tl.sum(xn.to(tl.float32)[:, None, :] * wv[None, :, :], axis=2)


@triton.jit
def _norm_logits(x_ptr, gate_ptr, r_ptr, nw_ptr, xn_ptr, res_ptr, t, e, h, tmask, H, stride_x, stride_r, eps, store,
                 HAS_NORM: tl.constexpr, BLOCK_T: tl.constexpr, EXPERTS_PER_PROGRAM: tl.constexpr,
                 BLOCK_H: tl.constexpr):
    """[BLOCK_T, EXPERTS_PER_PROGRAM] fp32 logits of experts e for tokens t, in blocks of BLOCK_H columns.
    HAS_NORM: of rms_norm(x + r) * nw (a first pass for each token's rstd), the normed rows and the new
    residual stored where store."""
    dt = x_ptr.dtype.element_ty
    if HAS_NORM:  # first pass: each token's rstd
        ss = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            m = tmask & (h0 + h < H)[None, :]
            xv = tl.load(x_ptr + t[:, None] * stride_x + h0 + h[None, :], mask=m, other=0.0).to(tl.float32)
            rv = tl.load(r_ptr + t[:, None] * stride_r + h0 + h[None, :], mask=m, other=0.0).to(tl.float32)
            sv = (xv + rv).to(dt).to(tl.float32)
            ss += tl.sum(sv * sv, axis=1)
        rstd = 1.0 / tl.sqrt(ss / H + eps)
    acc = tl.zeros((BLOCK_T, EXPERTS_PER_PROGRAM), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hm = h0 + h < H
        m = tmask & hm[None, :]
        xv = tl.load(x_ptr + t[:, None] * stride_x + h0 + h[None, :], mask=m, other=0.0).to(tl.float32)
        if HAS_NORM:
            rv = tl.load(r_ptr + t[:, None] * stride_r + h0 + h[None, :], mask=m, other=0.0).to(tl.float32)
            sv = (xv + rv).to(dt)
            nw = tl.load(nw_ptr + h0 + h, mask=hm, other=0.0).to(tl.float32)
            xn = (sv.to(tl.float32) * rstd[:, None] * nw[None, :]).to(dt)
            if store:
                tl.store(res_ptr + t[:, None] * H + h0 + h[None, :], sv, mask=m)
                tl.store(xn_ptr + t[:, None] * H + h0 + h[None, :], xn, mask=m)
            xv = xn.to(tl.float32)
        wv = tl.load(gate_ptr + e[:, None] * H + h0 + h[None, :], mask=hm[None, :], other=0.0)
        acc += tl.sum(xv[:, None, :] * wv[None, :, :], axis=2)
    return acc


def route(logits: torch.Tensor, expert_bias: torch.Tensor | None, top_k: int, *, score_function: str = "sigmoid",
          n_group: int | None = None, topk_group: int | None = None, norm_topk_prob: bool = True,
          routed_scaling_factor: float = 1.0, num_appended: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose experts. logits: [T, E] (read as fp32). Returns (weights [T, K + num_appended] float32,
    ids [T, K + num_appended] int64); see the oracle for num_appended."""
    t, e = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    weights = torch.empty(t, top_k + num_appended, dtype=torch.float32, device=logits.device)
    ids = torch.empty(t, top_k + num_appended, dtype=torch.int64, device=logits.device)
    if t == 0:
        return weights, ids
    grouped = n_group is not None and topk_group is not None and n_group > 1
    block_e = triton.next_power_of_2(e)
    block_t = max(1, min(16, 1024 // block_e))
    bias = expert_bias.float().contiguous() if expert_bias is not None else logits
    _route_kernel[(triton.cdiv(t, block_t),)](
        logits, bias, weights, ids, t, logits.stride(0), float(routed_scaling_factor),
        E=e, K=top_k, SOFTMAX=score_function == "softmax", HAS_BIAS=expert_bias is not None,
        N_GROUP=n_group if grouped else 1, TOPK_GROUP=topk_group if grouped else 1, NORM=bool(norm_topk_prob),
        N_APPENDED=num_appended, BLOCK_T=block_t, BLOCK_E=block_e,
        BLOCK_K=triton.next_power_of_2(top_k + num_appended),
        BLOCK_G=triton.next_power_of_2(n_group if grouped else 1), num_warps=4)
    return weights, ids


GATE_ROUTE_MAX_TOKENS = 16  # up to here one fused launch; beyond, cuBLAS logits + the routing kernel
# The fused launch's programs: E / EXPERTS_PER_PROGRAM, each computing that many experts' logits, of ROUTER_WARPS
# warps (benchmarks/router_sweep.py sweeps both: on an H100 other shapes were faster alone and not in the step).
EXPERTS_PER_PROGRAM = 2
ROUTER_WARPS = 4
# A row that fits one block (decode at one token): every input loaded at once (`_norm_logits_whole_row`).
# P2M_ROUTER_WHOLE_ROW=0: the two passes (A/B runs).
ROUTER_WHOLE_ROW = os.environ.get("P2M_ROUTER_WHOLE_ROW", "1") != "0"
_COUNTERS: dict = {}


def gate_route(x: torch.Tensor, gate_weight: torch.Tensor, expert_bias: torch.Tensor | None, top_k: int,
               **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """route(F.linear(x.float(), gate_weight), expert_bias, top_k, **kw); one launch for decode sizes."""
    if not _fused(x, gate_weight):
        return route(torch.nn.functional.linear(x.float(), gate_weight), expert_bias, top_k, **kw)
    return _gate_route(x, None, gate_weight, expert_bias, top_k, kw)


def add_rms_norm_gate_route(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                            gate_weight: torch.Tensor, expert_bias: torch.Tensor | None, top_k: int, after=None,
                            **kw):
    """(normed, residual', weights, ids): add_rms_norm(x, residual), then gate_route on the normed rows;
    one launch for decode sizes (the norm computed inside the router's launch). after(normed, ids, keep),
    when given and the launch is the fused one, is called right after it (keep: the router's inputs and
    scratch) and its result returned fifth (moe.add_rms_norm_gate_route_gate_up)."""
    if not fused_norm_route(x, residual, gate_weight):
        normed, residual = add_rms_norm(x, residual, norm_weight, eps)
        return (normed, residual, *gate_route(normed, gate_weight, expert_bias, top_k, **kw))
    return _gate_route(x, (residual, norm_weight, eps), gate_weight, expert_bias, top_k, kw, after)


def fused_norm_route(x: torch.Tensor, residual: torch.Tensor, gate_weight: torch.Tensor) -> bool:
    return _fused(x, gate_weight) and residual.dtype == x.dtype


def _fused(x: torch.Tensor, gate_weight: torch.Tensor) -> bool:
    return (x.shape[0] <= GATE_ROUTE_MAX_TOKENS and gate_weight.shape[0] % EXPERTS_PER_PROGRAM == 0
            and gate_weight.dtype == torch.float32)


def _gate_route(x, norm, gate_weight, expert_bias, top_k: int, kw: dict, after=None):
    t, hidden = x.shape
    e = gate_weight.shape[0]
    n_app = kw.get("num_appended", 0)
    weights = torch.empty(t, top_k + n_app, dtype=torch.float32, device=x.device)
    ids = torch.empty(t, top_k + n_app, dtype=torch.int64, device=x.device)
    if x.stride(-1) != 1:
        x = x.contiguous()
    if norm is not None:
        residual, norm_weight, eps = norm
        residual = residual if residual.stride(-1) == 1 else residual.contiguous()
        normed, new_residual = torch.empty_like(x), torch.empty_like(x)
        norm_args = (residual, norm_weight, normed, new_residual, residual.stride(0), eps)
    else:
        norm_args = (x, x, x, x, 0, 0.0)
    if t == 0:
        return (weights, ids) if norm is None else (normed, new_residual, weights, ids)
    gate_weight = gate_weight.contiguous()
    counter = _COUNTERS.get(x.device)
    if counter is None:  # zero once; the last program of every launch resets it (made before graph capture)
        counter = _COUNTERS[x.device] = torch.zeros(1, dtype=torch.int32, device=x.device)
    logits = torch.empty(t, e, dtype=torch.float32, device=x.device)
    n_group, topk_group = kw.get("n_group"), kw.get("topk_group")
    grouped = n_group is not None and topk_group is not None and n_group > 1
    per = EXPERTS_PER_PROGRAM
    bias = expert_bias.float().contiguous() if expert_bias is not None else logits
    # as much of the row a load as registers allow: few dependent load rounds (latency, not bandwidth)
    block_h = min(triton.next_power_of_2(hidden), max(64, 4096 // (triton.next_power_of_2(t) * per)))
    _gate_route_kernel[(e // per,)](
        x, gate_weight, logits, counter, bias, weights, ids, t, hidden, x.stride(0),
        float(kw.get("routed_scaling_factor", 1.0)), *norm_args, E=e, K=top_k,
        SOFTMAX=kw.get("score_function") == "softmax",
        HAS_BIAS=expert_bias is not None, N_GROUP=n_group if grouped else 1, TOPK_GROUP=topk_group if grouped else 1,
        NORM=bool(kw.get("norm_topk_prob", True)), N_APPENDED=n_app, EXPERTS_PER_PROGRAM=per,
        BLOCK_H=block_h,
        BLOCK_T=triton.next_power_of_2(t), BLOCK_E=triton.next_power_of_2(e),
        BLOCK_K=triton.next_power_of_2(top_k + n_app), BLOCK_G=triton.next_power_of_2(n_group if grouped else 1),
        HAS_NORM=norm is not None, WHOLE_ROW=ROUTER_WHOLE_ROW and block_h >= hidden, PDL=pdl_flag(x),
        num_warps=ROUTER_WARPS)
    if after is not None:
        return normed, new_residual, weights, ids, after(normed, ids, (x, gate_weight, logits, bias, *norm_args))
    return (weights, ids) if norm is None else (normed, new_residual, weights, ids)


@triton.jit(do_not_specialize=["N", "padding_slot", "local_start", "local_end"])
def _map_experts_kernel(ids_ptr, out_ptr, table_ptr, counts_ptr, load_ptr, slots_ptr, N, padding_slot,
                        local_start, local_end, K: tl.constexpr, L: tl.constexpr, R: tl.constexpr,
                        P: tl.constexpr, COUNT: tl.constexpr, HAS_SLOTS: tl.constexpr, LOCAL: tl.constexpr,
                        BLOCK: tl.constexpr):
    """One program a block of (token, k) pairs: its logical expert's load counted (atomically), its replica
    picked by pair index, and the physical id (or this rank's slot, -1 elsewhere) written."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < N
    e = tl.load(ids_ptr + i, mask=m, other=0)
    routed = e < L
    logical = tl.where(routed, e, 0)
    count = tl.load(counts_ptr + logical, mask=m, other=1)
    phys = tl.load(table_ptr + logical * R + i % count, mask=m & routed, other=0)
    phys = tl.where(routed, phys, e - L + P)
    if COUNT:
        counted = m & routed
        if HAS_SLOTS:
            counted = counted & (tl.load(slots_ptr + i // K, mask=m, other=padding_slot) != padding_slot)
        tl.atomic_add(load_ptr + logical, tl.full((BLOCK,), 1, tl.int32), mask=counted, sem="relaxed")
    if LOCAL:
        phys = tl.where((phys >= local_start) & (phys < local_end), phys - local_start, -1)
    tl.store(out_ptr + i, phys.to(tl.int64), mask=m)


def map_experts(ids: torch.Tensor, table: torch.Tensor, counts: torch.Tensor, num_physical: int,
                load: torch.Tensor | None = None, slots: torch.Tensor | None = None, padding_slot: int = -1,
                local: tuple[int, int] | None = None) -> torch.Tensor:
    """The oracle's `map_experts` (kernels/routing.py) in one launch; load must be int32."""
    t, k = ids.shape
    out = torch.empty(t, k, dtype=torch.int64, device=ids.device)
    n = t * k
    if n == 0:
        return out
    ids = ids.contiguous()
    block = min(1024, max(32, triton.next_power_of_2(n)))
    start, end = local if local is not None else (0, 0)
    _map_experts_kernel[(triton.cdiv(n, block),)](
        ids, out, table, counts, load if load is not None else counts, slots if slots is not None else ids, n,
        int(padding_slot), int(start), int(end), K=k, L=table.shape[0], R=table.shape[1], P=int(num_physical),
        COUNT=load is not None, HAS_SLOTS=slots is not None, LOCAL=local is not None, BLOCK=block, num_warps=4)
    return out
