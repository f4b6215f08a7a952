#!/usr/bin/env python3
"""Compile the Triton kernels for Hopper (sm_90) on a machine with no GPU, and report each variant's
registers, stack (spills), shared memory, and whether its loads are pipelined (cp.async / TMA) and its
dots use wgmma. Costs no device time: run it before a GPU call to drop configs that spill or do not fit.

    python benchmarks/aot_check.py            # the configs benchmarks/gpu_kernels.py would sweep
    python benchmarks/aot_check.py --committed  # only the committed tables / defaults
    python benchmarks/aot_check.py --quant --only qgemv   # the quantized GEMVs, with each one's inner loop:
                                                          # the instructions a thread issues per chunk (SASS)

How: JITFunction.run is replaced by a compile-only version that specialises the arguments as the real
launcher would (CPU tensors stand in for CUDA ones: 16-byte aligned pointers, ints divisible by 16)
and compiles for GPUTarget("cuda", 90, 32) with the ptxas shipped in the triton wheel.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime import jit as _jit  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
BACKEND = make_backend(TARGET)
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
REPORT: dict = {}
LABEL = [""]  # what the compiles being made serve (--quant: method / tokens / variant)


def _loads(ptx: str) -> str:
    """The kernel's global loads by width, in the PTX: "16Bx4 2Bx64 cp16x8" (bytes a load instruction x how many
    instructions; cp: cp.async to shared memory)."""
    counts: dict = {}
    for m in re.finditer(r"ld\.global(?:\.\w+)*?(?:\.v(\d))?\.[busf](\d+)\s", ptx):
        key = f"{int(m[1] or 1) * int(m[2]) // 8}B"
        counts[key] = counts.get(key, 0) + 1
    for m in re.finditer(r"cp\.async\.c[ag]\.shared\.global\s*\[[^]]*\],\s*\[[^]]*\],\s*(0x[0-9a-f]+|\d+)", ptx):
        key = f"cp{int(m[1], 0)}B"
        counts[key] = counts.get(key, 0) + 1
    return " ".join(f"{k}x{v}" for k, v in sorted(counts.items()))


def _inner_loop(sass: str) -> int:
    """Instructions in the kernel's longest innermost loop (sm_90 SASS: a backward branch's body holding no other
    backward branch), the work a thread issues per trip of a GEMV's chunk loop; 0 without a loop."""
    ins = [(int(m[1], 16), m[2]) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = [(int(m[1], 16), a) for a, text in ins if (m := re.search(r"BRA (0x[0-9a-f]+)", text))
             and int(m[1], 16) < a]
    inner = [(lo, hi) for lo, hi in loops if not any(lo <= lo2 and hi2 <= hi and (lo2, hi2) != (lo, hi)
                                                     for lo2, hi2 in loops)]
    return max((sum(lo <= a <= hi for a, _ in ins) for lo, hi in inner), default=0)


def _compile_only(self, *args, grid, warmup, **kwargs):
    kwargs["debug"] = kwargs.get("debug", self.debug)
    binder = _jit.create_function_from_signature(self.signature, self.params, BACKEND)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = self._pack_args(BACKEND, kwargs, bound_args, specialization, options)
    key = (self.fn.__name__, str(sorted((str(k), str(v)) for k, v in constexprs.items())), str(attrs),
           options.num_warps, options.num_stages)
    if key in REPORT:
        return None
    t = time.time()
    try:
        k = triton.compile(ASTSource(self, signature, constexprs, attrs), target=TARGET, options=options.__dict__)
    except Exception as e:  # noqa: BLE001
        REPORT[key] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        ru = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([CUOBJDUMP, "-sass", f.name], capture_output=True, text=True).stdout
    line = next((ln.strip() for ln in ru.splitlines() if "REG:" in ln), "")
    fields = dict(p.split(":") for p in line.split() if ":" in p)
    ptx = k.asm["ptx"]
    consts = {str(k_[0]) if isinstance(k_, tuple) else str(k_): v for k_, v in constexprs.items()}
    names = [p.name for p in self.params]
    consts = {names[int(k_)] if k_.isdigit() else k_: v for k_, v in consts.items()}
    REPORT[key] = {"kernel": self.fn.__name__, "consts": {k_: v for k_, v in consts.items() if k_.isupper()},
                   "warps": options.num_warps, "stages": options.num_stages, "regs": int(fields.get("REG", -1)),
                   "stack": int(fields.get("STACK", -1)), "smem": k.metadata.shared,
                   "cp_async": "cp.async" in ptx, "tma": "cp.async.bulk" in ptx, "wgmma": "wgmma" in ptx,
                   "loads": _loads(ptx), "loop": _inner_loop(sass), "label": LABEL[0],
                   "grid": grid if isinstance(grid, tuple) else None,
                   "secs": round(time.time() - t, 2)}
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--committed", action="store_true")
    ap.add_argument("--only", default="", help="substring of kernel names")
    ap.add_argument("--quant", action="store_true", help="only the quantized MoE (quant.py) at Param2's shapes, "
                    "every variant of quant.MOE_VARIANTS, int4 and fp8, at 1, 8, 64 and 256 tokens")
    args = ap.parse_args()
    _jit.JITFunction.run = _compile_only
    if args.quant:
        quant_main()
        print_report(args.only, quant=True)
        return
    from param2moe.kernels.triton import attention as ta
    from param2moe.kernels.triton import moe as tm
    from param2moe.kernels.triton import norm as tn
    from param2moe.kernels.triton import routing as tr
    from param2moe.kernels.triton.moe_configs import default_config

    bf = torch.bfloat16
    e, h, i, k = 64, 2048, 2048, 6
    w13 = torch.empty(e, 2 * i, h, dtype=bf)
    w2 = torch.empty(e, h, i, dtype=bf)
    import importlib.util

    spec = importlib.util.spec_from_file_location("gk", os.path.join(ROOT, "benchmarks", "gpu_kernels.py"))
    sys.argv = [sys.argv[0]]  # the benchmark parses its own arguments at import: none (not --dry)
    gk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gk)

    ts = [1, 8, 64, 256, 2048] if args.committed else [1, 16, 64, 256, 1024, 2048]
    for t in ts:
        x = torch.randn(t, h).to(bf)
        ids = torch.rand(t, e).topk(k, dim=-1).indices
        w = torch.rand(t, k)
        if args.committed:
            tm.moe_experts(x, w13, w2, w, ids, config=default_config(t, k))
            continue
        for bm in gk.moe_bms(t):
            al = tm.moe_align(ids, e, bm)
            inter = torch.empty(al[0].shape[0], i, dtype=bf)
            for g in gk.moe_cands(t, bm, "gate_up"):
                tm.gate_up(x, w13, al, k, bm, g)
            for g in gk.moe_cands(t, bm, "down"):
                tm.down(inter, w2, al, t * k, bm, g)
        tm.combine(torch.empty(t * k, h, dtype=bf), w, ids, torch.empty(t, h, dtype=bf))
    # attention
    nh, nkv, d = 32, 8, 64
    kc = torch.empty(200, 16, nkv, d, dtype=bf)
    for q_lens, cands in (([1] * 4, gk.DECODE_CANDS), ([64, 1], gk.PREFILL_CANDS)):
        q = torch.empty(sum(q_lens), nh, d, dtype=bf)
        tables = torch.zeros(len(q_lens), 64, dtype=torch.int32)
        ctx = torch.ones(len(q_lens), dtype=torch.int32)
        qsl = torch.zeros(len(q_lens) + 1, dtype=torch.int64)
        for c in ([ta.DECODE_CFG if len(q_lens) == 4 else ta.PREFILL_CFG] if args.committed else cands):
            for s in (1, 8):
                ta.paged_attention(q, kc, kc, tables, ctx, qsl, 0.125, max(q_lens), 1024, num_splits=s, config=c)
    for t in (1, 64):
        xx = torch.empty(t, h, dtype=bf)
        tn.rms_norm(xx, torch.empty(h, dtype=bf), 1e-6)
        tn.add_rms_norm(xx, xx, torch.empty(h, dtype=bf), 1e-6)
        qkv = torch.empty(t, (nh + 2 * nkv) * d, dtype=bf)
        q, kk, _ = qkv.split([nh * d, nkv * d, nkv * d], dim=-1)
        tn.qk_norm_rope(q.view(t, nh, d), kk.view(t, nkv, d), torch.empty(d, dtype=bf), torch.empty(d, dtype=bf),
                        torch.empty(t, d // 2), torch.empty(t, d // 2), 1e-6)
        tr.route(torch.empty(t, e), torch.empty(e), k, routed_scaling_factor=2.5)

    print_report(args.only)


def quant_main():
    """The quantized MoE's launches (quant.moe_experts) at Param2-17B's shapes: 64 + 2 experts (the shared
    expert folded in), hidden 2048, width 2048, top 6 + 2, for each variant."""
    from param2moe.kernels.triton import moe_configs
    from param2moe.kernels.triton import quant as tq
    from param2moe.quant import formats

    moe_configs.card_name = lambda index=None: "H100"  # the GPU's tuned tables, not the CPU's defaults
    tq.usable = lambda x, qw: True  # CPU tensors stand in for CUDA ones
    bf = torch.bfloat16
    e, h, i, k = 66, 2048, 2048, 8
    for method, block in (("int4", False), ("fp8", False)):
        w13 = formats.empty((e, 2 * i, h), method, block=block)
        w2 = formats.empty((e, h, i), method, block=block)
        for t in (1, 8, 64, 256):
            x = torch.randn(t, h).to(bf)
            ids = torch.cat([torch.rand(t, e - 2).topk(k - 2, dim=-1).indices,
                             torch.arange(e - 2, e).expand(t, -1)], 1).contiguous()
            w = torch.rand(t, k)
            for v in tq.MOE_VARIANTS:
                LABEL[0] = f"{method}/{t}/{v}"
                tq.moe_experts(x, w13, w2, w, ids, num_appended=2, variant=v)
            if method == "int4" and t > 1:  # the tiled qkv: the default (joined) int4 step, unjoined, N tiles of 16
                for v in ("default", "nojoin", "lin16"):
                    LABEL[0] = f"{method}/{t}/qkv/{v}"
                    tq.linear(x, formats.empty((3072, h), method), variant=v)
            if t == 1:  # the linear GEMV (qkv) and the dense MLP (width 9216) as one expert, each variant
                mlp13, mlp2 = formats.empty((1, 2 * 9216, h), method), formats.empty((1, h, 9216), method)
                one, zero = torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.long)
                for v in tq.MOE_VARIANTS:
                    LABEL[0] = f"{method}/1/qkv/{v}"
                    tq.linear(x, formats.empty((3072, h), method), variant=v)
                    LABEL[0] = f"{method}/1/mlp/{v}"
                    tq.moe_experts(x, mlp13, mlp2, one, zero, variant=v)


QUANT_CONSTS = ("K", "METHOD", "GATED", "BLOCK_M", "BLOCK_N", "BLOCK_K", "JOIN", "PIPE", "XSPLIT")


def print_report(only: str, quant: bool = False):
    if quant:
        print(f"{'first use':<22} {'kern':<4} {'consts':<84} {'w':>2} {'s':>2} {'regs':>4} {'stack':>5} {'smem':>6} "
              f"{'grid':>6} {'loop':>5} global loads (bytes an instruction x instructions)")
    else:
        print(f"{'kernel':<22} {'consts':<70} {'w':>2} {'s':>2} {'regs':>4} {'stack':>5} {'smem':>6} pipe wgmma")
    for r in REPORT.values():
        if "error" in r:
            print("ERROR", r["error"])
            continue
        if only and only not in r["kernel"]:
            continue
        c = {k_: v for k_, v in r["consts"].items() if k_ not in ("IEEE", "INTERP", "EVEN_K", "TOPK")}
        if quant:
            c = " ".join(f"{k_}={int(v) if isinstance(v, bool) else v}" for k_, v in c.items() if k_ in QUANT_CONSTS)
            print(f"{r['label']:<22} {r['kernel'][1:5]:<4} {c[:84]:<84} {r['warps']:>2} {r['stages']:>2} "
                  f"{r['regs']:>4} {r['stack']:>5} {r['smem']:>6} {str(r['grid'] and r['grid'][0]):>6} {r['loop']:>5} "
                  f"{r['loads']}")
            continue
        print(f"{r['kernel'][:22]:<22} {str(c)[:70]:<70} {r['warps']:>2} {r['stages']:>2} {r['regs']:>4} "
              f"{r['stack']:>5} {r['smem']:>6} {'y' if r['cp_async'] else '-':>4} {'y' if r['wgmma'] else '-':>5}")


if __name__ == "__main__":
    main()
