#!/usr/bin/env python3
"""Check and time the Triton kernels (param2moe/kernels/triton/) on the GPU, in one call.

    python3 benchmarks/gpu_kernels.py [--out DIR] [--quick] [--no-tests] [--budget SECONDS]

1. the copy bandwidth and bf16 matmul rate of this card (the floors below are taken from them);
2. tests/test_triton_kernels.py on CUDA, split over several pytest processes, while warm-up workers
   (this script with --warm i/n) compile every kernel variant the timing phase will launch (Triton's
   on-disk cache then serves the main process);
3. timings (triton.testing.do_bench, median, L2 flushed before each replay; every call inside a CUDA graph,
   several calls with different inputs a graph so that decode-size launches are timed without launch gaps
   or L2 reuse) of each kernel vs the plain torch path and vs the bytes / FLOPs floor; the fused MoE's
   block sizes are tuned per token-count bucket (each GEMM separately, per BLOCK_M), the attention's per case;
4. JSON under --out ($OUT): results, the tuned MoE table (moe_configs_<card>.json, the format of
   param2moe/kernels/triton/moe_configs.json) and the test log; a short table printed last.
--quick: no tuning sweep, just the committed configs vs torch. --dry: CPU interpreter, tiny shapes (plumbing).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ap = argparse.ArgumentParser()
ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_kernels_out"))
ap.add_argument("--quick", action="store_true")
ap.add_argument("--no-tests", action="store_true")
ap.add_argument("--dry", action="store_true")
ap.add_argument("--warm", default=None, help="i/n: compile-only worker for jobs i::n")
ap.add_argument("--nwarm", type=int, default=10)
ap.add_argument("--ntest", type=int, default=5)
ap.add_argument("--budget", type=float, default=330.0, help="seconds for the timing phase before it cuts sweeps")
ap.add_argument("--moe-sweep-max", type=int, default=1 << 30, help="tune the MoE only up to this many tokens")
ap.add_argument("--attn-quick", action="store_true", help="attention: the committed heuristics only, no sweep")
ARGS = ap.parse_args()
if ARGS.dry:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402
import triton.testing  # noqa: E402
from gpu_timing import graph_us  # noqa: E402

from param2moe.kernels import attention as ref_attn  # noqa: E402
from param2moe.kernels import moe as ref_moe  # noqa: E402
from param2moe.kernels import norm as ref_norm  # noqa: E402
from param2moe.kernels import rope as ref_rope  # noqa: E402
from param2moe.kernels import routing as ref_routing  # noqa: E402
from param2moe.kernels.triton import attention as ta  # noqa: E402
from param2moe.kernels.triton import moe as tm  # noqa: E402
from param2moe.kernels.triton import norm as tn  # noqa: E402
from param2moe.kernels.triton import routing as tr  # noqa: E402
from param2moe.kernels.triton.moe_configs import get_config, shape_key  # noqa: E402

WARM = ARGS.warm is not None
DRY = ARGS.dry
DEV = "cpu" if DRY else "cuda"
BF16 = torch.bfloat16
NAN = float("nan")
T0 = time.time()
if DRY:
    E, H, I, K = 8, 64, 32, 2  # noqa: E741
    NH, NKV, D = 8, 2, 64
    MOE_TS = [2, 4, 40]  # one token runs the one-token GEMVs, which take no config
else:
    E, H, I, K = 64, 2048, 2048, 6  # noqa: E741
    NH, NKV, D = 32, 8, 64
    MOE_TS = [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]  # (one token: no config)
EXPERT_BYTES = 3 * H * I * 2


def log(*a, sep=" "):
    if not WARM:
        print(f"[{time.time() - T0:6.1f}s]", *a, sep=sep, flush=True)


# --------------------------------------------------------------------------------- timing
def _sync():
    if not DRY:
        torch.cuda.synchronize()


def time_graph(fns, rep=50):
    """Microseconds a call (gpu_timing.graph_us); NAN where nothing is timed (--warm, --dry)."""
    for f in fns:
        f()
    _sync()
    if WARM or DRY:
        return NAN
    return graph_us(fns, rep)


def time_eager(fn, rep=50):
    fn()
    _sync()
    if WARM or DRY:
        return NAN
    return triton.testing.do_bench(fn, warmup=5, rep=rep, return_mode="median") * 1e3


def safe(fn, *a, **k):
    try:
        return fn(*a, **k)
    except Exception as e:  # a config that does not compile (shared memory), or a kernel that fails
        msg = f"{type(e).__name__}: {str(e)[:200]}"
        log("  failed:", msg)
        return msg


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def fmt(v, nd=1):
    return f"{v:.{nd}f}" if isinstance(v, float) and math.isfinite(v) else str(v)[:60]


def over_budget() -> bool:
    return not WARM and time.time() - T0 > ARGS.budget


# --------------------------------------------------------------------------------- ceilings
def ceilings():
    if DRY or WARM:
        return {"copy_TBps": 3.0, "mm_TFLOPs": 790.0}
    n = 1 << 30
    a = torch.empty(n // 2, dtype=BF16, device=DEV).normal_()
    b = torch.empty_like(a)
    bufs = {"src": a, "dst": b}
    ms = triton.testing.do_bench(lambda: bufs["dst"].copy_(bufs["src"]), warmup=10, rep=100, return_mode="median")
    bw = 2 * n / ms / 1e9
    bufs.clear()
    m = 8192
    x = torch.randn(m, m, device=DEV, dtype=BF16)
    y = torch.randn(m, m, device=DEV, dtype=BF16)
    ms = triton.testing.do_bench(lambda: x @ y, warmup=10, rep=100, return_mode="median")
    return {"copy_TBps": bw, "mm_TFLOPs": 2 * m**3 / ms / 1e9}


CEIL = None


def floor_us(nbytes, flops=0.0):
    return max(nbytes / (CEIL["copy_TBps"] * 1e12), flops / (CEIL["mm_TFLOPs"] * 1e12)) * 1e6


# --------------------------------------------------------------------------------- MoE
_MOE_W = {}


def moe_weights():
    if not _MOE_W:
        torch.manual_seed(0)
        _MOE_W["w13"] = (torch.randn(E, 2 * I, H, device=DEV) * H**-0.5).to(BF16)
        _MOE_W["w2"] = (torch.randn(E, H, I, device=DEV) * I**-0.5).to(BF16)
    return _MOE_W["w13"], _MOE_W["w2"]


def moe_inputs(t):
    """Routing sets drawn uniformly at random (docs/model.md §7): several a graph at decode sizes, so the timed
    calls read different experts and the L2 cannot serve a repeat."""
    r = 8 if t <= 16 else 4 if t <= 256 else 2 if t <= 2048 else 1
    g = torch.Generator(device=DEV).manual_seed(t)
    x = torch.randn(t, H, device=DEV, generator=g).to(BF16)
    sets = []
    for _ in range(r):
        ids = torch.rand(t, E, device=DEV, generator=g).topk(K, dim=-1).indices
        w = torch.rand(t, K, device=DEV, generator=g)
        sets.append((ids, w / w.sum(-1, keepdim=True) * 2.5))
    return x, sets


def G(bn, bk, gm, w, s):
    return {"BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gm, "num_warps": w, "num_stages": s}


def moe_bms(t):
    if DRY:
        return [16]
    if t <= 16:
        return [16]
    if t <= 64:
        return [16, 32]
    if t <= 256:
        return [16, 32, 64]
    if t <= 1024:
        return [32, 64, 128]
    return [64, 128]


def moe_cands(t, bm, which):
    if DRY:
        return [G(32, 32, 1, 4, 2), G(16, 64, 1, 4, 2)]
    if t <= 64:  # deep pipelines (few, long programs) and shallow ones (more programs resident an SM)
        c = [G(16, 256, 1, 4, 3), G(32, 128, 1, 4, 4), G(32, 256, 1, 4, 3), G(64, 128, 1, 4, 4), G(64, 256, 1, 4, 3),
             G(128, 128, 1, 4, 3), G(32, 128, 1, 4, 2), G(32, 128, 1, 2, 3), G(16, 128, 1, 2, 3), G(32, 64, 1, 2, 4),
             G(64, 128, 1, 4, 2), G(16, 256, 1, 2, 2)]
    elif t <= 512:
        c = [G(32, 128, 1, 4, 4), G(64, 128, 1, 4, 3), G(64, 64, 1, 4, 4), G(128, 64, 1, 4, 4), G(128, 128, 1, 8, 3),
             G(64, 256, 1, 4, 3)]
    else:
        c = [G(64, 64, 8, 4, 4), G(128, 64, 8, 4, 3), G(128, 64, 8, 8, 4), G(64, 128, 8, 4, 3), G(128, 128, 8, 8, 3),
             G(256, 64, 8, 8, 3)]
    nb = 2 if which == "gate_up" else 1  # gate_up has two B tiles and two accumulators

    def fits(g):  # rules read off benchmarks/aot_check.py (sm_90): shared memory, and no spills
        smem = g["num_stages"] * (bm * g["BLOCK_K"] + nb * g["BLOCK_N"] * g["BLOCK_K"]) * 2
        acc_regs = nb * bm * g["BLOCK_N"] / (32 * g["num_warps"])
        return smem <= 220 * 1024 and acc_regs <= 128

    return [g for g in c if fits(g)]


def moe_sweep(t, bm):
    """Time align, each gate_up and each down candidate at (t, bm): {'align', 'gate_up': [...], 'down': [...]}."""
    w13, w2 = moe_weights()
    x, sets = moe_inputs(t)
    out = {"BLOCK_M": bm}
    aligns = [tm.moe_align(ids, E, bm) for ids, _ in sets]
    out["align_us"] = safe(time_graph, [lambda ids=ids: tm.moe_align(ids, E, bm) for ids, _ in sets])
    base_g1 = moe_cands(t, bm, "gate_up")[0]
    inters = [tm.gate_up(x, w13, a, K, bm, base_g1) for a in aligns]
    for which in ("gate_up", "down"):
        rows = []
        for g in moe_cands(t, bm, which):
            if over_budget():
                break
            if which == "gate_up":
                fns = [lambda a=a, g=g: tm.gate_up(x, w13, a, K, bm, g) for a in aligns]
            else:
                fns = [lambda a=a, it=it, g=g: tm.down(it, w2, a, t * K, bm, g) for a, it in zip(aligns, inters)]
            rows.append({"cfg": g, "us": safe(time_graph, fns)})
        out[which] = rows
    return out


def _best(rows):
    ok = [r for r in rows if isinstance(r["us"], float) and math.isfinite(r["us"])]
    return min(ok, key=lambda r: r["us"]) if ok else None


def moe_final(t, sweeps):
    """Pick the best config from the sweeps (or the committed one), time the whole op vs torch."""
    w13, w2 = moe_weights()
    x, sets = moe_inputs(t)
    res = {"T": t, "routing_sets": len(sets)}
    best, best_total = None, None
    for sw in sweeps:
        g1, g2 = _best(sw.get("gate_up", [])), _best(sw.get("down", []))
        if g1 is None or g2 is None or not isinstance(sw["align_us"], float):
            continue
        total = sw["align_us"] + g1["us"] + g2["us"]
        if best_total is None or total < best_total:
            best_total = total
            best = {"BLOCK_M": sw["BLOCK_M"], "gate_up": g1["cfg"], "down": g2["cfg"]}
    committed = get_config(t, E, H, I, K, BF16)
    res["committed_cfg"] = committed
    res["tuned_cfg"] = best
    cfg = best or committed
    res["cfg"] = cfg
    run = lambda c: [lambda ids=ids, w=w: tm.moe_experts(x, w13, w2, w, ids, config=c) for ids, w in sets]  # noqa
    res["triton_us"] = safe(time_graph, run(cfg))
    if best is not None and best != committed:
        res["committed_us"] = safe(time_graph, run(committed))
    if not WARM:
        ids, w = sets[0]
        res["torch_us"] = safe(time_eager, lambda: ref_moe.moe_experts(x, w13, w2, w, ids))
        got = tm.moe_experts(x, w13, w2, w, ids, config=cfg)
        res["rel_err"] = rel_err(got, ref_moe.moe_experts(x, w13, w2, w, ids))
        distinct = sum(len(torch.unique(i)) for i, _ in sets) / len(sets)
        nbytes = distinct * EXPERT_BYTES + t * H * 2 * 2
        flops = 2.0 * t * K * 3 * H * I
        res.update(distinct_experts=distinct, bytes=nbytes, flops=flops, floor_us=floor_us(nbytes, flops))
        if isinstance(res["triton_us"], float) and res["triton_us"] > 0:
            res["TBps"] = nbytes / res["triton_us"] / 1e6
            res["TFLOPs"] = flops / res["triton_us"] / 1e6
    return res


# --------------------------------------------------------------------------------- attention
def paged_case(q_lens, ctx_lens, copies=1, seed=0):
    """`copies` independent caches (like layers) with one shared random block table."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    b = len(q_lens)
    need = [-(-c // 16) for c in ctx_lens]
    nb = sum(need) + 1
    perm = torch.randperm(nb, generator=g)
    tables = torch.zeros(b, max(need), dtype=torch.int32)
    used = 0
    for s, n in enumerate(need):
        tables[s, :n] = perm[used:used + n].int()
        used += n
    caches = [(torch.randn(nb, 16, NKV, D, device=DEV).to(BF16), torch.randn(nb, 16, NKV, D, device=DEV).to(BF16))
              for _ in range(copies)]
    qsl = torch.zeros(b + 1, dtype=torch.int64)
    qsl[1:] = torch.tensor(q_lens).cumsum(0)
    q = torch.randn(int(qsl[-1]), NH, D, device=DEV).to(BF16)
    return q, caches, tables.to(DEV), torch.tensor(ctx_lens, dtype=torch.int32, device=DEV), qsl.to(DEV)


DECODE_CANDS = [{"BLOCK_N": 32, "num_warps": 4, "num_stages": 2}, {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
                {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3}, {"BLOCK_N": 128, "num_warps": 4, "num_stages": 2},
                {"BLOCK_N": 128, "num_warps": 4, "num_stages": 3}, {"BLOCK_N": 256, "num_warps": 4, "num_stages": 2},
                {"BLOCK_N": 256, "num_warps": 8, "num_stages": 2}]
PREFILL_CANDS = [{"BLOCK_Q": 16, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
                 {"BLOCK_Q": 16, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
                 {"BLOCK_Q": 32, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
                 {"BLOCK_Q": 32, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
                 {"BLOCK_Q": 16, "BLOCK_N": 128, "num_warps": 4, "num_stages": 2},
                 {"BLOCK_Q": 32, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3}]


def flash_baseline(q_lens, ctx_lens):
    """torch's FlashAttention-2 op on a contiguous (unpaged) KV of the same lengths (GPU_NOTES)."""
    b = len(q_lens)
    k = torch.randn(sum(ctx_lens), NKV, D, device=DEV, dtype=BF16)
    v = torch.randn_like(k)
    q = torch.randn(sum(q_lens), NH, D, device=DEV, dtype=BF16)
    cq = torch.zeros(b + 1, dtype=torch.int32, device=DEV)
    cq[1:] = torch.tensor(q_lens, device=DEV).cumsum(0)
    ck = torch.zeros(b + 1, dtype=torch.int32, device=DEV)
    ck[1:] = torch.tensor(ctx_lens, device=DEV).cumsum(0)
    fn = lambda: torch.ops.aten._flash_attention_forward(  # noqa: E731
        q, k, v, cq, ck, max(q_lens), max(ctx_lens), 0.0, True, False, scale=D**-0.5)
    return time_graph([fn])


def attn_job(name, q_lens, ctx_lens, max_ctx=None, splits_try=()):
    decode = max(q_lens) == 1
    kv_bytes = sum(ctx_lens) * 2 * NKV * D * 2
    copies = 1 if DRY else max(1, min(8, int(64e6 // kv_bytes)))
    q, caches, tables, ctx, qsl = paged_case(q_lens, ctx_lens, copies)
    max_ctx = max_ctx or max(ctx_lens)
    args = lambda kc, vc: (q, kc, vc, tables, ctx, qsl, D**-0.5, max(q_lens), max_ctx)  # noqa: E731
    res = {"case": name, "B": len(q_lens), "q_lens": q_lens[:4], "ctx_lens": ctx_lens[:4], "max_context_len": max_ctx,
           "copies": copies}
    cands = DECODE_CANDS if decode else PREFILL_CANDS
    if ARGS.quick or ARGS.attn_quick or DRY:
        cands = [ta.DECODE_CFG if decode else ta.PREFILL_CFG]
        splits_try = ()
    rows = []
    for c in cands:
        if over_budget() and rows:
            break
        fns = [lambda kc=kc, vc=vc, c=c: ta.paged_attention(*args(kc, vc), config=c) for kc, vc in caches]
        rows.append({"cfg": c, "us": safe(time_graph, fns)})
    res["sweep"] = rows
    best = _best(rows)
    cfg = best["cfg"] if best else cands[0]
    res["cfg"] = cfg
    res["triton_us"] = best["us"] if best else NAN
    res["splits_default"] = ta.choose_splits(
        len(q_lens) * NKV if decode else (q.shape[0] // cfg.get("BLOCK_Q", 16) + len(q_lens)) * NKV, max_ctx,
        cfg["BLOCK_N"], 4 if DRY else torch.cuda.get_device_properties(0).multi_processor_count)
    fns = [lambda kc=kc, vc=vc: ta.paged_attention(*args(kc, vc)) for kc, vc in caches]
    res["committed_us"] = safe(time_graph, fns)  # the committed heuristics: config=None, splits=None
    sp = []
    for s in splits_try:
        fns = [lambda kc=kc, vc=vc, s=s: ta.paged_attention(*args(kc, vc), num_splits=s, config=cfg)
               for kc, vc in caches]
        sp.append({"splits": s, "us": safe(time_graph, fns)})
    res["splits_sweep"] = sp
    if not WARM:
        kc, vc = caches[0]
        got = ta.paged_attention(*args(kc, vc), config=cfg)
        res["rel_err"] = rel_err(got, ref_attn.paged_attention(*args(kc, vc)))
        res["torch_us"] = safe(time_eager, lambda: ref_attn.paged_attention(*args(kc, vc)))
        if not DRY:
            res["flash_contig_us"] = safe(flash_baseline, q_lens, ctx_lens)
        flops = 0.0
        for ql, cl in zip(q_lens, ctx_lens):
            keys = sum(cl - ql + i + 1 for i in range(ql))
            flops += 4.0 * keys * NH * D
        res.update(bytes=kv_bytes, flops=flops, floor_us=floor_us(kv_bytes + 2 * q.numel() * 2, flops))
    return res


# --------------------------------------------------------------------------------- small ops
def small_ops_job(t):
    res = {"T": t}
    reps = 1 if DRY else 16
    x = torch.randn(reps, t, H, device=DEV).to(BF16)
    r = torch.randn(reps, t, H, device=DEV).to(BF16)
    w = torch.randn(H, device=DEV).to(BF16)
    qkv = torch.randn(reps, t, (NH + 2 * NKV) * D, device=DEV).to(BF16)
    qw, kw = torch.randn(D, device=DEV).to(BF16), torch.randn(D, device=DEV).to(BF16)
    pos = torch.randint(0, 4096, (t,), device=DEV).float()
    ang = pos[:, None] * (1e6 ** (-torch.arange(D // 2, device=DEV).float() / (D // 2)))[None, :]
    cos, sin = ang.cos(), ang.sin()
    logits = torch.randn(reps, t, E, device=DEV)
    bias = torch.randn(E, device=DEV) * 0.1
    nb = max(8, -(-t * reps // 16) + 1)
    kc = torch.randn(nb, 16, NKV, D, device=DEV).to(BF16)
    vc = torch.randn_like(kc)
    slots = torch.randperm(nb * 16, device=DEV)[: t * reps].view(reps, t)
    kn = torch.randn(reps, t, NKV, D, device=DEV).to(BF16)

    def split(i):
        q, k, _ = qkv[i].split([NH * D, NKV * D, NKV * D], dim=-1)
        return q.view(t, NH, D), k.view(t, NKV, D)

    def torch_qk(i):
        q, k = split(i)
        return ref_rope.qk_norm_rope(q, k, qw, kw, cos, sin, 1e-6)

    def tri_qk(i):
        q, k = split(i)
        return tn.qk_norm_rope(q, k, qw, kw, cos, sin, 1e-6)

    ops = {
        "add_rms_norm": (lambda i: ref_norm.add_rms_norm(x[i], r[i], w, 1e-6),
                         lambda i: tn.add_rms_norm(x[i], r[i], w, 1e-6), 3 * t * H * 2),
        "rms_norm": (lambda i: ref_norm.rms_norm(x[i], w, 1e-6), lambda i: tn.rms_norm(x[i], w, 1e-6), 2 * t * H * 2),
        "qk_norm_rope": (torch_qk, tri_qk, 2 * t * (NH + NKV) * D * 2),
        "route": (lambda i: ref_routing.route(logits[i], bias, K, routed_scaling_factor=2.5),
                  lambda i: tr.route(logits[i], bias, K, routed_scaling_factor=2.5), t * E * 4 + t * K * 12),
        "write_kv_cache": (lambda i: ref_attn.write_kv_cache(kn[i], kn[i], kc, vc, slots[i]),
                           lambda i: ta.write_kv_cache(kn[i], kn[i], kc, vc, slots[i]), 4 * t * NKV * D * 2),
    }
    for name, (tf, ff, nbytes) in ops.items():
        row = {"bytes": nbytes}
        row["triton_us"] = safe(time_graph, [lambda i=i, ff=ff: ff(i) for i in range(reps)])
        row["torch_us"] = safe(time_graph, [lambda i=i, tf=tf: tf(i) for i in range(reps)])
        if not WARM and name != "write_kv_cache":
            a, b = ff(0), tf(0)
            a, b = (a, b) if isinstance(a, tuple) else ((a,), (b,))
            row["rel_err"] = max(rel_err(u.float(), v.float()) for u, v in zip(a, b))
        if not WARM:
            row["floor_us"] = floor_us(nbytes)
        res[name] = row
    return res


# --------------------------------------------------------------------------------- the job list
def attn_cases():
    if DRY:
        return [("decode_b2_ctx40", [1, 1], [40, 17], None, (1, 2)), ("prefill_30", [30], [30], None, ())]
    return [
        ("decode_b1_ctx1024", [1], [1024], None, (8, 16, 32)),
        ("decode_b1_ctx4096", [1], [4096], None, (16, 32, 64)),
        ("decode_b1_ctx1024_graphmax4096", [1], [1024], 4096, ()),
        ("decode_b8_ctx2048", [1] * 8, [2048] * 8, None, (1, 4, 8)),
        ("decode_b32_ctx1024", [1] * 32, [1024] * 32, None, (1, 2)),
        ("decode_b64_ctx1024", [1] * 64, [1024] * 64, None, ()),
        ("decode_b128_ctx1024", [1] * 128, [1024] * 128, None, ()),
        ("prefill_2048", [2048], [2048], None, ()),
        ("chunk512_over1500", [512], [2012], None, ()),
        ("mixed_chunk256_plus_31_decodes", [256] + [1] * 31, [1280] + [1024] * 31, None, ()),
    ]


def jobs():
    """(key, fn) in a fixed order; warm workers take every n-th."""
    out = [("small_ops_1", lambda: small_ops_job(1)), ("small_ops_64", lambda: small_ops_job(64)),
           ("small_ops_2048", lambda: small_ops_job(2048 if not DRY else 33))]
    for c in attn_cases():
        out.append((f"attn_{c[0]}", lambda c=c: attn_job(*c)))
    if not ARGS.quick:
        for t in [t for t in MOE_TS if t <= ARGS.moe_sweep_max]:
            for bm in moe_bms(t):
                out.append((f"moe_sweep_{t}_{bm}", lambda t=t, bm=bm: moe_sweep(t, bm)))
    for t in MOE_TS:
        out.append((f"moe_final_{t}", lambda t=t: moe_final(t, [])))  # warm: the committed config
    return out


# --------------------------------------------------------------------------------- tests
def start_tests(n):
    ids = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "tests/test_triton_kernels.py"],
                         cwd=ROOT, capture_output=True, text=True).stdout.split()
    ids = [i for i in ids if "::" in i]
    procs = []
    for k in range(n):
        chunk = ids[k::n]
        if chunk:
            procs.append(subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *chunk],
                                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return len(ids), procs


def start_warmers(n):
    procs = []
    for k in range(n):
        cmd = [sys.executable, os.path.abspath(__file__), "--warm", f"{k}/{n}", "--out", ARGS.out,
               "--moe-sweep-max", str(ARGS.moe_sweep_max)]
        cmd += ["--quick"] if ARGS.quick else []
        cmd += ["--attn-quick"] if ARGS.attn_quick else []
        procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


# --------------------------------------------------------------------------------- main
def warm_main():
    k, n = (int(v) for v in ARGS.warm.split("/"))
    global CEIL
    CEIL = ceilings()
    for _key, fn in jobs()[k::n]:
        safe(fn)


def dump_table(tables: dict) -> str:
    """{card: {shape: {bucket: cfg}}} as JSON with one line per bucket."""
    lines = ["{"]
    for ci, (card, shapes) in enumerate(tables.items()):
        lines.append(f' "{card}": {{')
        for si, (shape, table) in enumerate(shapes.items()):
            lines.append(f'  "{shape}": {{')
            items = sorted(table.items(), key=lambda kv: int(kv[0]))
            for bi, (bucket, cfg) in enumerate(items):
                lines.append(f'   "{bucket}": {json.dumps(cfg)}' + ("," if bi < len(items) - 1 else ""))
            lines.append("  }" + ("," if si < len(shapes) - 1 else ""))
        lines.append(" }" + ("," if ci < len(tables) - 1 else ""))
    lines.append("}")
    return "\n".join(lines) + "\n"


def git_commit():
    if os.environ.get("P2M_COMMIT"):
        return os.environ["P2M_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return out if len(out) == 40 else ""
    except OSError:
        return ""


def main():
    global CEIL
    os.makedirs(ARGS.out, exist_ok=True)
    card = "cpu" if DRY else torch.cuda.get_device_name(0)
    short = "cpu" if DRY else ("H200" if "H200" in card else "H100" if "H100" in card else card.replace(" ", "_"))
    result = {"card": card, "card_short": short, "date": datetime.date.today().isoformat(), "commit": git_commit(),
              "torch": torch.__version__, "triton": triton.__version__, "quick": ARGS.quick}
    path = os.path.join(ARGS.out, "gpu_kernels.json")

    def save():
        with open(path, "w") as f:
            json.dump(result, f, indent=1, default=str)

    log("card", card, "torch", torch.__version__, "triton", triton.__version__)
    # tests and compile workers run together (CPU-bound compiles), then the ceilings and timings alone
    tests, warmers = ([], []) if DRY else (None, None)
    if not DRY:
        n_ids, tests = start_tests(0 if ARGS.no_tests else ARGS.ntest)
        warmers = start_warmers(ARGS.nwarm)
        log(f"started {len(tests)} test processes ({n_ids} tests) and {len(warmers)} compile workers")
    test_log = []
    for p in tests:
        out, _ = p.communicate()
        test_log.append(out)
    summary = [ln for out in test_log for ln in out.splitlines() if " passed" in ln or " failed" in ln
               or ln.startswith("FAILED") or ln.startswith("ERROR")]
    result["tests"] = summary
    with open(os.path.join(ARGS.out, "tests.log"), "w") as f:
        f.write("\n\n".join(test_log))
    log("tests:", *summary[:20], sep="\n  ")
    for p in warmers:
        out, _ = p.communicate()
        bad = [ln for ln in out.splitlines() if "Error" in ln or "failed" in ln]
        if bad:
            log("warm worker:", *bad[:5], sep="\n  ")
    log("compile workers done")
    CEIL = ceilings()
    result["ceilings"] = CEIL
    log(f"copy {CEIL['copy_TBps']:.2f} TB/s, bf16 matmul {CEIL['mm_TFLOPs']:.0f} TFLOP/s")
    save()

    sweeps, finals, attn, small = {}, {}, [], []
    for key, fn in jobs():
        if over_budget() and key.startswith("moe_sweep"):
            continue
        if key.startswith("moe_final"):
            t = int(key.rsplit("_", 1)[1])
            r = safe(moe_final, t, sweeps.get(t, []))
            finals[t] = r
            if isinstance(r, dict):
                log(f"moe T={t}: {fmt(r.get('triton_us'))} us (torch {fmt(r.get('torch_us'))}) "
                    f"floor {fmt(r.get('floor_us'))} err {fmt(r.get('rel_err'), 5)}")
        elif key.startswith("moe_sweep"):
            _, _, t, bm = key.split("_")
            r = safe(fn)
            if isinstance(r, dict):
                sweeps.setdefault(int(t), []).append(r)
        elif key.startswith("attn"):
            r = safe(fn)
            attn.append(r)
            if isinstance(r, dict):
                log(f"{key}: {fmt(r['triton_us'])} us (torch {fmt(r.get('torch_us'))}, "
                    f"flash {fmt(r.get('flash_contig_us'))}) floor {fmt(r.get('floor_us'))} "
                    f"err {fmt(r.get('rel_err'), 5)}")
        else:
            small.append(safe(fn))
        result.update(small_ops=small, attention=attn, moe=finals, moe_sweeps=sweeps)
        save()

    # the tuned MoE table, in the format of param2moe/kernels/triton/moe_configs.json
    table = {str(t): r["tuned_cfg"] for t, r in finals.items() if isinstance(r, dict) and r.get("tuned_cfg")}
    if table:
        with open(os.path.join(ARGS.out, f"moe_configs_{short}.json"), "w") as f:
            f.write(dump_table({short: {shape_key(E, H, I, K, BF16): table}}))
    result["elapsed_s"] = time.time() - T0
    save()

    # ------------------------------------------------------------------ the table, last
    def f(v, nd=1):
        return f"{v:.{nd}f}" if isinstance(v, float) and math.isfinite(v) else "-"

    print(f"\n== {card}  copy {CEIL['copy_TBps']:.2f} TB/s  matmul {CEIL['mm_TFLOPs']:.0f} TFLOP/s  "
          f"({time.time() - T0:.0f} s)")
    print("tests:", "; ".join(summary[-ARGS.ntest:]) if summary else "not run")
    print(f"{'MoE T':>6} {'triton us':>10} {'torch us':>9} {'floor us':>9} {'TB/s':>6} {'TFLOP/s':>8} {'err':>8}  cfg")
    for t, r in sorted(finals.items()):
        if not isinstance(r, dict):
            print(f"{t:>6} {r}")
            continue
        c = r["cfg"]
        cs = f"M{c['BLOCK_M']} gu{c['gate_up']['BLOCK_N']}x{c['gate_up']['BLOCK_K']}w{c['gate_up']['num_warps']}" \
             f"s{c['gate_up']['num_stages']} dn{c['down']['BLOCK_N']}x{c['down']['BLOCK_K']}w{c['down']['num_warps']}" \
             f"s{c['down']['num_stages']}"
        print(f"{t:>6} {f(r.get('triton_us'))!s:>10} {f(r.get('torch_us'))!s:>9} {f(r.get('floor_us'))!s:>9} "
              f"{f(r.get('TBps'), 2)!s:>6} {f(r.get('TFLOPs'), 0)!s:>8} {r.get('rel_err', NAN):>8.1e}  {cs}")
    print(f"{'attention':<34} {'best':>8} {'commit':>8} {'torch':>8} {'flash':>8} {'floor':>7} {'err':>8}  cfg")
    for r in attn:
        if isinstance(r, dict):
            print(f"{r['case']:<34} {f(r['triton_us'])!s:>8} {f(r.get('committed_us'))!s:>8} "
                  f"{f(r.get('torch_us'))!s:>8} "
                  f"{f(r.get('flash_contig_us'))!s:>8} {f(r.get('floor_us'))!s:>7} {r.get('rel_err', NAN):>8.1e}  "
                  f"{r['cfg']} splits={r['splits_default']} {[(s['splits'], f(s['us'])) for s in r['splits_sweep']]}")
    print(f"{'op':<16} {'T':>5} {'triton us':>10} {'torch us':>9} {'floor us':>9} {'err':>8}")
    for r in small:
        if isinstance(r, dict):
            for name, row in r.items():
                if name != "T":
                    print(f"{name:<16} {r['T']:>5} {f(row['triton_us'], 2)!s:>10} {f(row['torch_us'], 2)!s:>9} "
                          f"{f(row.get('floor_us'), 2)!s:>9} {row.get('rel_err', NAN):>8.1e}")


if __name__ == "__main__":
    if WARM:
        warm_main()
    else:
        main()
