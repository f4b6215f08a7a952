#!/usr/bin/env python3
"""Check and time the quantized-weight Triton kernels (param2moe/kernels/triton/quant.py) on one GPU, in one call.

    python3 benchmarks/quant_gpu_bench.py [--out DIR] [--quick] [--no-tests] [--budget SECONDS]
    python3 benchmarks/quant_gpu_bench.py --e2e none,fp8,int4 --e2e-only      # the engine, a method a process

Real Param2-17B shapes (the writer's `param2-17b` preset): the MoE layer with the shared expert folded in
(64 + 2 experts of width 2048, top 6 + 2, hidden 2048), attention's qkv (3072 x 2048) and dense (2048 x 2048)
projections, and at one token the first layer's dense MLP (width 9216) and the head (128,008 x 2048), at
T = 1, 8, 64, 256 tokens, bf16 (the existing kernels, as the engine calls them) and each method: int8,
int4 (group 128), fp8 (per channel), fp8-block (128 x 128).
1. tests/test_triton_quant.py on CUDA, in a few pytest processes, while compile workers (this script with
   --warm i/n) compile every kernel variant the timings launch (Triton's on-disk cache serves the main process);
2. the copy bandwidth of this card;
3. timings: triton.testing.do_bench (median, L2 flushed before each replay) of a CUDA graph holding several
   calls, each on another layer's weights (and, for the MoE, another routing set: experts drawn uniformly at
   random), so that neither launch gaps nor the L2 flatter a call. Each row: microseconds a call, the bytes it
   must read (weights of the experts its routing touches, scales included, and the activations) over the
   copy bandwidth = the floor, the share of that floor, the speed-up over bf16, and the error against torch
   on the dequantized weights (asserted: < 1e-2 relative; 1.5e-1 where the activations are rounded to fp8, 4e-2
   where int4's GEMV takes them in int8).
   Variants: the GEMV and the tiled GEMM forced at 1 and 8 tokens; fp8's other activation mode at each T
   ("w8a8": fp8 activations where the default keeps bf16, "wo": weight-only where it rounds them); --variants:
   quant.MOE_VARIANTS beside the default; unless --quick, sweeps of unpipelined GEMV shapes (GEMV_CANDS, in
   place of quant.GEMV_CONFIGS' entry) and of the tiled MoE's and linear's block sizes, best printed;
4. --e2e M1,M2..: `param2moe bench latency --load-format dummy --preset param2-17b --batch-size 1 64` with each
   --quantization listed ("none": bf16; "+head" appended: --quantize-head too), decode graphs only;
5. JSON to --out (default $OUT, else benchmarks/results/quant_gpu_bench): quant_gpu_bench.json, tests.log.
--dry: the CPU interpreter on tiny shapes (plumbing only).
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
ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "results", "quant_gpu"))
ap.add_argument("--quick", action="store_true", help="no sweeps: the committed configs only")
ap.add_argument("--no-tests", action="store_true")
ap.add_argument("--e2e", default="", help="methods for the engine's bench latency: none,fp8,fp8-block,int4,int8 "
                "(+head: the head quantized too)")
ap.add_argument("--e2e-only", action="store_true", help="only the engine runs (no tests, no kernel timings)")
ap.add_argument("--dry", action="store_true")
ap.add_argument("--warm", default=None, help="i/n: compile-only worker for jobs i::n")
ap.add_argument("--nwarm", type=int, default=8)
ap.add_argument("--ntest", type=int, default=3)
ap.add_argument("--budget", type=float, default=240.0, help="seconds from the start after which sweeps are cut")
ap.add_argument("--methods", default="int8,int4,fp8,fp8-block")
ap.add_argument("--variants", default="", help="quantized MoE variants (quant.MOE_VARIANTS) timed beside the default "
                "at every T where they change what runs: 'all' or names")
ap.add_argument("--e2e-variants", default="", help="with --e2e: the engine again per quantized method with "
                "P2M_QUANT_MOE_VARIANT set: 'auto' (the kernel winners at 1 token and at 64, joined with '+') or names")
ARGS = ap.parse_args()
if ARGS.dry:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.testing  # noqa: E402
from gpu_timing import graph_us  # noqa: E402

from param2moe.kernels import moe as ref_moe  # noqa: E402
from param2moe.kernels.triton import gemv as tri_gemv  # noqa: E402
from param2moe.kernels.triton import moe as tri_moe  # noqa: E402
from param2moe.kernels.triton import quant as tq  # noqa: E402
from param2moe.quant import QuantizedWeight, dequantize, quantize  # noqa: E402
from param2moe.writer import PRESETS  # noqa: E402

WARM, DRY = ARGS.warm is not None, ARGS.dry
DEV = "cpu" if DRY else "cuda"
BF16 = torch.bfloat16
NAN = float("nan")
T0 = time.time()
METHODS = ARGS.methods.split(",")
P = PRESETS["param2-17b"]
if DRY:
    H, I, E_ROUTED, TOPK, N_SHARED, MLP_W, VOCAB = 128, 128, 8, 2, 2, 256, 512  # noqa: E741
    QKV_N, ATTN_K, TS, LAYERS = 192, 128, [1, 8], 1
else:
    H, I, E_ROUTED, TOPK = P["hidden_size"], P["moe_intermediate_size"], P["num_experts"], P["num_experts_per_tok"]  # noqa: E741
    N_SHARED = P["moe_shared_expert_intermediate_size"] // I  # the shared expert folded in as pieces of width I
    MLP_W, VOCAB = P["intermediate_size"], P["vocab_size"]
    ATTN_K = P["num_attention_heads"] * P["head_dim"]
    QKV_N = (P["num_attention_heads"] + 2 * P["num_key_value_heads"]) * P["head_dim"]
    TS, LAYERS = [1, 8, 64, 256], 1 if WARM else 4
E, K = E_ROUTED + N_SHARED, TOPK + N_SHARED
PREFILL_T = 64 if DRY else 2048  # a prompt's tokens: where fp8 activations may pay (compute-bound tiles)
LINEARS = {"qkv": (QKV_N, H), "dense": (H, ATTN_K)}


def log(*a):
    if not WARM:
        print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def over_budget() -> bool:
    return not WARM and time.time() - T0 > ARGS.budget


def safe(fn, *a, **k):
    try:
        return fn(*a, **k)
    except Exception as e:  # noqa: BLE001  (a config that does not compile, or a failing kernel: recorded)
        msg = f"{type(e).__name__}: {str(e)[:300]}"
        log("  failed:", msg)
        return msg


# --------------------------------------------------------------------------------- timing
def time_graph(fns, rep=40):
    """Microseconds a call (gpu_timing.graph_us); NAN where nothing is timed (--warm, --dry)."""
    for f in fns:
        f()
    if DRY or WARM:
        return NAN
    return graph_us(fns, rep)


def copy_bandwidth() -> float:
    if DRY or WARM:
        return 3.0e12
    a = torch.empty(1 << 30, dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=10, rep=100, return_mode="median")
    return 2 * a.numel() / ms * 1e3


BW = None


def rel_err(out, ref) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# --------------------------------------------------------------------------------- weights
_CACHE: dict = {}


def _bf16(key, shape, seed):
    """LAYERS copies of a random bf16 weight (the layers a graph's calls cycle through)."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    return [(torch.randn(*shape, device=DEV, generator=g) * shape[-1] ** -0.5).to(BF16) for _ in range(LAYERS)]


def weights(op: str, method: str):
    """[per layer] bf16 tensors or QuantizedWeights of op: qkv / dense / head (one matrix), moe / mlp (w13, w2)."""
    key = (op, method)
    if key not in _CACHE:
        if WARM and _CACHE and next(iter(_CACHE))[1] != method:
            _CACHE.clear()  # compile workers keep one method's weights at a time
        if op in ("moe", "mlp"):
            e, width = (E, I) if op == "moe" else (1, MLP_W)
            src = list(zip(_bf16(op + "13", (e, 2 * width, H), 1), _bf16(op + "2", (e, H, width), 2)))
            _CACHE[key] = src if method == "bf16" else [tuple(_quant(w, method) for w in pair) for pair in src]
        else:
            n, k = LINEARS.get(op, (VOCAB, H))
            src = _bf16(op, (n, k), 3)
            _CACHE[key] = src if method == "bf16" else [_quant(w, method) for w in src]
    return _CACHE[key]


def _quant(w, method):
    """quantize(w), a 3-D stack expert by expert (a whole layer's fp32 temporaries would take ~7 GB)."""
    one = lambda v: quantize(v, "fp8", block=True) if method == "fp8-block" else quantize(v, method)  # noqa: E731
    if w.dim() == 2:
        return one(w)
    parts = [one(v) for v in w]
    return QuantizedWeight(parts[0].method, torch.stack([q.qweight for q in parts]),
                           torch.stack([q.scale for q in parts]), tuple(w.shape), parts[0].group_size)


def nbytes(w) -> int:
    if isinstance(w, torch.Tensor):
        return w.numel() * w.element_size()
    return w.nbytes()


def expert_bytes(w13, w2) -> float:
    """Bytes of one expert of the stacks (scales included)."""
    return (nbytes(w13) + nbytes(w2)) / w13.shape[0]


# --------------------------------------------------------------------------------- ops
def routing_sets(t: int, n: int):
    """n routing sets of t tokens: TOPK experts of E_ROUTED uniformly at random, the folded shared expert's
    pieces appended (weight 1), as the engine's dummy-weight benchmarks route."""
    g = torch.Generator(device=DEV).manual_seed(1000 + t)
    sets = []
    for _ in range(n):
        ids = torch.rand(t, E_ROUTED, device=DEV, generator=g).topk(TOPK, dim=-1).indices
        ids = torch.cat([ids, torch.arange(E_ROUTED, E, device=DEV).expand(t, -1)], dim=1).contiguous()
        w = torch.rand(t, TOPK, device=DEV, generator=g)
        w = torch.cat([w / w.sum(-1, keepdim=True) * 2.5, torch.ones(t, N_SHARED, device=DEV)], dim=1).contiguous()
        sets.append((w, ids))
    return sets


def bf16_linear(x, w):
    """What the engine runs for a bf16 projection (kernels.linear): the Triton GEMV at a few tokens, else cuBLAS."""
    if not DRY and tri_gemv.usable(x, w, None):
        return tri_gemv.gemv(x, w)
    return F.linear(x, w)


def make_calls(op, method, t, variant, ws, x):
    """The calls a graph holds (one a layer) and the oracle of the first."""
    if op in ("moe", "mlp"):
        sets = routing_sets(t, len(ws)) if op == "moe" else [(torch.ones(t, 1, device=DEV),
                                                             torch.zeros(t, 1, dtype=torch.long, device=DEV))] * len(ws)
        kw = variant if isinstance(variant, dict) else {"act": ACTS[variant]} if variant in ACTS else {}
        if method == "bf16":
            fns = [lambda w=w, s=s: tri_moe.moe_experts(x, w[0], w[1], *s, **kw) for w, s in zip(ws, sets)]
        else:
            n_app = N_SHARED if op == "moe" else 0
            fns = [lambda w=w, s=s: tq.moe_experts(x, w[0], w[1], *s, num_appended=n_app, **kw)
                   for w, s in zip(ws, sets)]

        def oracle():
            w13, w2 = (ws[0] if method == "bf16" else (dequantize(ws[0][0], BF16), dequantize(ws[0][1], BF16)))
            return ref_moe.moe_experts(x, w13, w2, *sets[0])

        touched = sum(len(torch.unique(s[1])) for s in sets) / len(sets)
        moved = touched * expert_bytes(*ws[0]) + 2 * t * H * 2
        return fns, oracle, moved
    head = op == "head"
    out_dtype = torch.float32 if head else None
    if method == "bf16":
        if head:
            fns = [lambda w=w: tri_gemv.gemv(x, w, out_dtype=torch.float32, block_n=tri_gemv.STREAM_BLOCK_N)
                   for w in ws]
        else:
            fns = [lambda w=w: bf16_linear(x, w) for w in ws]
    else:
        path, config = (variant if variant in ("gemv", "mma") else None), (variant if isinstance(variant, tuple)
                                                                           else None)
        act = ACTS.get(variant) if isinstance(variant, str) else None
        vname = variant.get("variant") if isinstance(variant, dict) else None
        fns = [lambda w=w: tq.linear(x, w, path=path, config=config, out_dtype=out_dtype, act=act, variant=vname)
               for w in ws]

    def oracle():
        w = ws[0] if method == "bf16" else dequantize(ws[0], BF16)
        return F.linear(x, w).to(out_dtype or x.dtype) if not head else F.linear(x.float(), w.float())

    return fns, oracle, nbytes(ws[0]) + t * ws[0].shape[-1] * 2 + t * ws[0].shape[0] * (4 if head else 2)


ACTS = {"w8a8": "fp8", "wo": "keep"}  # variants forcing fp8 activations / weight-only (quant.activation_mode)
METHOD_CODES = {"int8": tq.INT8, "int4": tq.INT4, "fp8": tq.FP8, "fp8-block": tq.FP8_BLOCK_SCALED}


def fp8_activations(op, method, t, variant) -> bool:
    """Whether the row's activations are rounded to fp8 (forced, or fp8 weights' default at t tokens)."""
    if isinstance(variant, str) and variant in ACTS:
        return variant == "w8a8"
    if op == "head" or method == "bf16":
        return False
    return tq.activation_mode(METHOD_CODES[method], t) == "fp8"


def int8_activations(op, t, variant, w) -> bool:
    """Whether the int4 row runs the GEMV with x in int8 (quant.gemv_x_int8, given the call make_calls makes)."""
    name = variant.get("variant") if isinstance(variant, dict) else None
    if op in ("moe", "mlp"):
        return tq.gemv_x_int8(w[0], "gate_up", name, t=t)
    return tq.gemv_x_int8(w, "linear", name, t=t, path=variant if variant in ("gemv", "mma") else None)


def run_case(op, method, t, variant="default", check=True, label=None):
    """One row: time, floor, error. variant: "default", "gemv" / "mma" (linear: the kernel forced), "w8a8" (fp8
    activations) or "wo" (weight-only: bf16 activations), a (BLOCK_M, config) of the tiled linear, or
    {"config": ...} of the tiled MoE."""
    ws = weights(op, method)
    g = torch.Generator(device=DEV).manual_seed(7 + t)
    x = torch.randn(t, LINEARS.get(op, (0, H))[1], device=DEV, generator=g).to(BF16)
    fns, oracle, moved = make_calls(op, method, t, variant, ws, x)
    name = label or (variant if isinstance(variant, str) else str(variant))
    row = {"op": op, "method": method, "T": t, "variant": name}
    row["us"] = time_graph(fns)
    if WARM:
        return row
    row.update(bytes=moved, floor_us=moved / BW * 1e6)
    if isinstance(row["us"], float) and row["us"] > 0:
        row["share_of_floor"] = row["floor_us"] / row["us"]
    if check:
        row["rel_err"] = rel_err(fns[0](), oracle())
        # the interpreter rounds bf16 toward zero; w8a8 rounds the activations to fp8 too, and int4's GEMV at a few
        # tokens takes x in int8 (quant.X_INT8, ~0.5% of a row at random), where the oracle keeps bf16
        row["fp8_act"] = fp8_activations(op, method, t, variant)
        int8_x = method == "int4" and int8_activations(op, t, variant, ws[0])
        row["ok"] = row["rel_err"] < (1.5e-1 if row["fp8_act"] else 4e-2 if DRY or int8_x else 1e-2)
    return row


# --------------------------------------------------------------------------------- jobs
def G(bn, bk, gm, w, s):
    return {"BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gm, "num_warps": w, "num_stages": s}


GEMV_CANDS = [(4096, 4), (4096, 8), (8192, 4), (8192, 8), (16384, 4), (16384, 8), (32768, 8)]
MOE_TILE_CANDS = [G(32, 128, 1, 4, 4), G(64, 128, 1, 4, 3), G(64, 64, 1, 4, 4), G(128, 128, 1, 4, 3),
                  G(32, 256, 1, 4, 3), G(64, 256, 1, 4, 3)]
LINEAR_TILE_CANDS = {8: [(16, G(16, 128, 1, 4, 4)), (16, G(32, 256, 1, 4, 3)), (16, G(64, 128, 1, 4, 4))],
                     64: [(32, G(32, 128, 1, 4, 4)), (64, G(64, 128, 1, 4, 3)), (16, G(64, 128, 1, 4, 4))],
                     256: [(64, G(128, 128, 4, 8, 3)), (128, G(64, 128, 4, 4, 3)), (64, G(64, 64, 4, 4, 4))]}


def gemv_sweep(method, use):
    """Each GEMV shape for `use` (linear: qkv at 1 token; gate_up / down: the MoE at 1 token)."""
    code = tq.method_code(weights("qkv", method)[0] if use == "linear" else weights("moe", method)[0][0])
    saved = tq.GEMV_CONFIGS[code][use]
    rows = []
    try:
        for cand in GEMV_CANDS[:2] if DRY else GEMV_CANDS:
            if over_budget():
                break
            tq.GEMV_CONFIGS[code][use] = cand
            r = safe(run_case, "qkv" if use == "linear" else "moe", method, 1, f"gemv_{use}={cand}", check=False)
            rows.append(r)
    finally:
        tq.GEMV_CONFIGS[code][use] = saved
    return rows


def moe_tile_sweep(method, t):
    """The tiled MoE's gate_up and down block sizes, each varied with the other at the committed config."""
    base = tq.moe_config(t, E, H, I, K, BF16, 0)
    rows = []
    for which in ("gate_up", "down"):
        for c in MOE_TILE_CANDS[:2] if DRY else MOE_TILE_CANDS:
            if over_budget():
                return rows
            cfg = {**base, which: c}
            rows.append(safe(run_case, "moe", method, t, {"config": cfg}, check=False, label=f"tile_{which}={c}"))
    return rows


def variant_names() -> list[str]:
    if not ARGS.variants:
        return []
    names = list(tq.MOE_VARIANTS) if ARGS.variants == "all" else ARGS.variants.split(",")
    for n in names:
        tq.moe_variant(n)  # an unknown name fails here, naming the known ones
    return [n for n in names if n != "default"]


def variant_jobs(method):
    """The MoE with each variant (`--variants`), at each T where it runs something else than the default."""
    code = METHOD_CODES[method]
    cases = [("moe", t) for t in TS] + [("mlp", 1)]  # mlp: the dense MLP at one token, as one expert
    out = [(f"{op}/{method}/{t}/v:{n}", lambda op=op, m=method, t=t, n=n: run_case(op, m, t, {"variant": n},
                                                                                  label=f"v:{n}"))
           for n in variant_names() for op, t in cases if tq.moe_variant(n).changes(t, code)]
    for n in variant_names():  # the linear layers: a variant's "linear" GEMV, and the joined int4 step's tiles
        v = tq.moe_variant(n)
        ts = [t for t in TS if t <= tq.GEMV_MAX_TOKENS[code]] if v.gemv_config(code, "linear") else []
        ts += [t for t in TS if t > tq.GEMV_MAX_TOKENS[code]] if v.joins_otherwise(code) or v.linear_tiles else []
        out += [(f"{op}/{method}/{t}/v:{n}", lambda op=op, m=method, t=t, n=n: run_case(op, m, t, {"variant": n},
                                                                                       label=f"v:{n}"))
                for op in ("qkv", "dense") for t in ts]
    return out


def jobs():
    """(key, fn) in a fixed order (by method: the compile workers hold one method's weights at a time)."""
    out = []
    for method in ["bf16", *METHODS]:
        for op in ("moe", "qkv", "dense"):
            for t in TS:
                out.append((f"{op}/{method}/{t}", lambda op=op, m=method, t=t: run_case(op, m, t)))
        if method != "bf16":
            out.extend(variant_jobs(method))
        for op in ("mlp", "head"):
            out.append((f"{op}/{method}/1", lambda op=op, m=method: run_case(op, m, 1)))
        if method == "bf16":
            for op in ("moe", "qkv"):
                out.append((f"{op}/bf16/{PREFILL_T}", lambda op=op: run_case(op, "bf16", PREFILL_T)))
            continue
        for t in [t for t in TS if t <= 8]:
            for path in ("gemv", "mma"):
                out.append((f"qkv/{method}/{t}/{path}", lambda m=method, t=t, p=path: run_case("qkv", m, t, p)))
        if method.startswith("fp8"):  # the default's other activation mode at each T: fp8 (w8a8) / weight-only
            for op in ("moe", "qkv"):
                for t in [*TS, PREFILL_T]:
                    if t == PREFILL_T:
                        out.append((f"{op}/{method}/{t}", lambda op=op, m=method, t=t: run_case(op, m, t)))
                    other = "wo" if fp8_activations(op, method, t, "default") else "w8a8"
                    out.append((f"{op}/{method}/{t}/{other}",
                                lambda op=op, m=method, t=t, o=other: run_case(op, m, t, o)))
        if ARGS.quick:
            continue
        for use in ("linear", "gate_up", "down"):
            out.append((f"sweep/gemv/{method}/{use}", lambda m=method, u=use: gemv_sweep(m, u)))
        for t in [t for t in TS if t > 1]:
            out.append((f"sweep/moe/{method}/{t}", lambda m=method, t=t: moe_tile_sweep(m, t)))
            for c in LINEAR_TILE_CANDS.get(t, LINEAR_TILE_CANDS[8][:1]):
                out.append((f"sweep/qkv/{method}/{t}/{c}",
                            lambda m=method, t=t, c=c: run_case("qkv", m, t, c, False, f"tile_linear={c}")))
    return out


# --------------------------------------------------------------------------------- processes
def start_tests(n):
    ids = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "tests/test_triton_quant.py"],
                         cwd=ROOT, capture_output=True, text=True).stdout.split()
    ids = [i for i in ids if "::" in i]
    procs = [subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *ids[k::n]], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for k in range(n) if ids[k::n]]
    return len(ids), procs


def start_warmers(n):
    cmd = [sys.executable, os.path.abspath(__file__), "--out", ARGS.out, "--methods", ARGS.methods]
    cmd += ["--quick"] if ARGS.quick else []
    return [subprocess.Popen([*cmd, "--warm", f"{k}/{n}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True) for k in range(n)]


def e2e_latency(out_dir, methods, variants=None):
    """bench latency of the dummy Param2-17B with each method (the engine, a process each); variants: {method:
    [variant names]}: that method again with P2M_QUANT_MOE_VARIANT set to each (rows "method@variant")."""
    base = [sys.executable, "-m", "param2moe.cli", "bench", "latency", "--load-format", "dummy", "--preset",
            "param2-17b", "--batch-size", "1", "64", "--input-len", "128", "--output-len", "128",
            "--max-graph-tokens", "0"]
    runs = [(q, None) for q in methods] + [(q, v) for q in methods for v in (variants or {}).get(q, [])]
    res = {}
    for q0, variant in runs:
        q = q0 if variant is None else f"{q0}@{variant}"
        js = os.path.join(out_dir, f"e2e_latency_{q.replace('+', '_')}.json")
        method, head = q0.removesuffix("+head"), q0.endswith("+head")
        cmd = base + ["--output-json", js] + ([] if method == "none" else ["--quantization", method])
        cmd += ["--quantize-head"] if head else []
        env = {**os.environ, "P2M_QUANT_MOE_VARIANT": variant or "default"}
        t = time.time()
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
        res[q] = {"cmd": " ".join(cmd[1:]), "rc": p.returncode, "secs": round(time.time() - t, 1),
                  "tail": (p.stdout + p.stderr)[-3000:]}
        if os.path.exists(js):
            with open(js) as f:
                res[q]["result"] = json.load(f)
        log(f"e2e {q}: rc {p.returncode} in {res[q]['secs']} s\n" + p.stdout[-1500:])
    return res


# --------------------------------------------------------------------------------- main
def fmt(v, nd=1):
    return f"{v:.{nd}f}" if isinstance(v, float) and math.isfinite(v) else "-"


def summarize(rows):
    """Speed-ups over bf16 (same op and T) and the best of each sweep."""
    base = {(r["op"], r["T"]): r["us"] for r in rows if isinstance(r, dict) and r["method"] == "bf16"}
    for r in rows:
        if isinstance(r, dict) and isinstance(r.get("us"), float) and r["us"] > 0:
            b = base.get((r["op"], r["T"]))
            if isinstance(b, float) and b > 0:
                r["speedup_vs_bf16"] = b / r["us"]
    best = {}
    for r in rows:
        if (isinstance(r, dict) and r["variant"] not in ("default", "gemv", "mma", "w8a8", "wo")
                and not r["variant"].startswith("v:") and isinstance(r.get("us"), float)):
            key = (r["op"], r["method"], r["T"], r["variant"].split("=")[0] if "=" in r["variant"] else "tile")
            if key not in best or r["us"] < best[key]["us"]:
                best[key] = r
    return best


def print_table(rows, best, card):
    print(f"\n== {card}  copy {BW / 1e12:.2f} TB/s  ({time.time() - T0:.0f} s)")
    print(f"{'op':<6} {'method':<10} {'T':>4} {'variant':<8} {'us':>8} {'floor us':>9} {'floor %':>8} "
          f"{'x bf16':>7} {'err':>8}")
    for r in rows:
        if isinstance(r, dict) and r["variant"] in ("default", "gemv", "mma", "w8a8", "wo"):
            share = r.get("share_of_floor", NAN) * 100
            print(f"{r['op']:<6} {r['method']:<10} {r['T']:>4} {r['variant']:<8} {fmt(r['us']):>8} "
                  f"{fmt(r.get('floor_us')):>9} {fmt(share, 0):>8} {fmt(r.get('speedup_vs_bf16'), 2):>7} "
                  f"{r.get('rel_err', NAN):>8.1e}" + ("" if r.get("ok", True) else "  FAIL"))
    if best:
        print("best of the sweeps (us):")
        for (op, m, t, kind), r in sorted(best.items(), key=lambda kv: str(kv[0])):
            print(f"  {op:<5} {m:<10} T={t:<4} {kind:<14} {fmt(r['us'])}  {r['variant']}")


def variant_table(rows) -> dict:
    """Per quantized method, op and T: the default and each variant (us, share of the floor, x the default) of the
    MoE, the dense MLP at one token and the linear layers (a variant's GEMV at one token, its tiles); the
    winner (fastest within the error limit). Returns the MoE's {method: {T: winner}}."""
    by = {}
    for r in rows:
        if (isinstance(r, dict) and r["op"] in ("moe", "mlp", "qkv", "dense") and r["method"] != "bf16"
                and isinstance(r.get("us"), float) and (r["variant"] == "default" or r["variant"].startswith("v:"))
                and r.get("ok", True)):
            by.setdefault((r["method"], r["op"], r["T"]), []).append(r)
    winners = {}
    if not ARGS.variants or not by:
        return winners
    print("\nquantized MoE variants (us a layer; % of the floor; x the default):")
    for (m, op, t), rs in sorted(by.items()):
        if len(rs) < 2:
            continue
        base = next((r["us"] for r in rs if r["variant"] == "default"), NAN)
        best = min(rs, key=lambda r: r["us"])
        winner = best["variant"].removeprefix("v:")
        if op == "moe":
            winners.setdefault(m, {})[t] = winner
        cells = "  ".join(f"{r['variant'].removeprefix('v:')} {fmt(r['us'])} "
                          f"({fmt(r.get('share_of_floor', NAN) * 100, 0)}%, x{fmt(base / r['us'], 2)})"
                          for r in sorted(rs, key=lambda r: r["us"]))
        print(f"  {op:<4} {m:<9} T={t:<4} winner {winner:<16} {cells}")
    return winners


def auto_variants(winners) -> dict:
    """{method: ["one-token winner+64-token winner"]} (what the engine runs at batch 1 and at batch 64)."""
    out = {}
    for m, by_t in winners.items():
        parts = [v for v in (by_t.get(1), by_t.get(64)) if v and v != "default"]
        parts = list(dict.fromkeys(parts))
        if parts:
            out[m] = ["+".join(parts)]
    return out


def print_e2e(res):
    """Decode step (the graph's GPU time where given) and TTFT per method and batch size."""
    if not res:
        return
    print(f"{'engine':<12} {'batch':>5} {'step ms':>8} {'GPU ms':>7} {'tok/s':>8} {'floor %':>8} {'TTFT ms':>8}")
    for q, r in res.items():
        rows = (r.get("result") or {}).get("rows") or []
        if not rows:
            print(f"{q:<12} rc {r.get('rc')}: {r.get('tail', '')[-300:]}")
        for row in rows if isinstance(rows, list) else []:
            itl, gpu = row.get("itl_s", NAN), row.get("graph_gpu_s", NAN)
            share = row.get("share_of_floor", NAN)
            print(f"{q:<12} {row.get('batch', '-'):>5} {fmt(itl * 1e3, 3):>8} {fmt(gpu * 1e3, 3):>7} "
                  f"{fmt(row.get('tok_per_s')):>8} {fmt(share * 100, 0):>8} {fmt(row.get('ttft_s', NAN) * 1e3):>8}")


def main():
    global BW
    os.makedirs(ARGS.out, exist_ok=True)
    card = "cpu" if DRY else torch.cuda.get_device_name(0)
    result = {"card": card, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "triton": triton.__version__, "quick": ARGS.quick,
              "shapes": {"H": H, "I": I, "E": E, "topk": K, "qkv": LINEARS["qkv"], "dense": LINEARS["dense"],
                         "mlp_width": MLP_W, "vocab": VOCAB, "layers_per_graph": LAYERS},
              "gemv_configs": {str(k): v for k, v in tq.GEMV_CONFIGS.items()},
              "variants": {n: tq.moe_variant(n)._asdict() for n in variant_names()}}
    path = os.path.join(ARGS.out, "quant_gpu_bench.json")

    def save():
        with open(path, "w") as f:
            json.dump(result, f, indent=1, default=str)

    log("card", card, "torch", torch.__version__, "triton", triton.__version__)
    if ARGS.e2e_only:
        methods = ARGS.e2e.split(",")
        variants = {m: ARGS.e2e_variants.split(",") for m in methods if m != "none"} if ARGS.e2e_variants else {}
        if ARGS.e2e_variants == "auto":
            raise SystemExit("--e2e-variants auto needs the kernel timings (drop --e2e-only)")
        result["e2e"] = e2e_latency(ARGS.out, methods, variants)
        save()
        print_e2e(result["e2e"])
        return
    tests, warmers = [], []
    if not DRY:
        n_ids, tests = start_tests(0 if ARGS.no_tests else ARGS.ntest)
        warmers = start_warmers(ARGS.nwarm)
        log(f"started {len(tests)} test processes ({n_ids} tests) and {len(warmers)} compile workers")
    test_log = [p.communicate()[0] for p in tests]
    result["tests"] = [ln for out in test_log for ln in out.splitlines()
                       if " passed" in ln or " failed" in ln or ln.startswith(("FAILED", "ERROR"))]
    with open(os.path.join(ARGS.out, "tests.log"), "w") as f:
        f.write("\n\n".join(test_log))
    log("tests:", *result["tests"][:20])
    for p in warmers:
        bad = [ln for ln in p.communicate()[0].splitlines() if "rror" in ln or "failed" in ln]
        if bad:
            log("compile worker:", *bad[:5])
    BW = copy_bandwidth()
    result["copy_TBps"] = BW / 1e12
    log(f"compile workers done; copy {BW / 1e12:.2f} TB/s")
    rows = []
    for key, fn in jobs():
        if key.startswith("sweep") and over_budget():
            continue
        r = safe(fn)
        rows.extend(r if isinstance(r, list) else [r])
        if isinstance(r, dict):
            log(f"{key}: {fmt(r.get('us'))} us, floor {fmt(r.get('floor_us'))}, err {r.get('rel_err', NAN):.1e}")
        result["rows"] = rows
        save()
    best = summarize(rows)
    result["best_of_sweeps"] = [{"key": list(k), **v} for k, v in best.items()]
    print_table(rows, best, card)
    result["variant_winners"] = winners = variant_table(rows)
    if ARGS.e2e and not DRY:
        methods = ARGS.e2e.split(",")
        if ARGS.e2e_variants == "auto":
            variants = auto_variants(winners)
        else:
            variants = {m: ARGS.e2e_variants.split(",") for m in methods if m != "none"} if ARGS.e2e_variants else {}
        result["e2e_variants"] = variants
        log("e2e variants:", variants or "none")
        result["e2e"] = e2e_latency(ARGS.out, methods, variants)
    result["elapsed_s"] = time.time() - T0
    save()
    print_e2e(result.get("e2e"))
    print("tests:", "; ".join(result["tests"][-ARGS.ntest:]) if result["tests"] else "not run")
    fails = [r for r in rows if isinstance(r, dict) and r.get("ok") is False]
    print(f"correctness: {len(fails)} of {sum(1 for r in rows if isinstance(r, dict) and 'ok' in r)} checked rows "
          "over their limit (1e-2; fp8 activations 1.5e-1, int4 GEMVs with x in int8 4e-2)"
          + ("" if not fails else ": " + ", ".join(f"{r['op']}/{r['method']}/{r['T']}" for r in fails)))
    print("JSON:", path)


def warm_main():
    k, n = (int(v) for v in ARGS.warm.split("/"))
    for _key, fn in jobs()[k::n]:
        safe(fn)


if __name__ == "__main__":
    if WARM:
        warm_main()
    else:
        main()
