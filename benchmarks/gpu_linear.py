#!/usr/bin/env python3
"""The Triton skinny matmul (param2moe/kernels/triton/matmul.py) against cuBLAS on Param2's decode shapes.

    python3 benchmarks/gpu_linear.py [--out DIR] [--rows 1 2 4 8 16]

For each weight shape (attention qkv and dense, the dense layer's gate/up and down) and row count:
cuBLAS (F.linear) and every config of a small sweep, each checked against an fp32 reference and timed
inside a CUDA graph that cycles through 8 copies of the weight (more than L2 holds, so each call reads
its weight from memory); the copy bandwidth of the same run gives each time's share of the floor.
Prints a table and writes linear_<card>.json under --out ($OUT).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from param2moe.kernels.triton import matmul as tm  # noqa: E402

SHAPES = {"qkv": (3072, 2048), "dense": (2048, 2048), "mlp_gate_up": (18432, 2048), "mlp_down": (2048, 9216)}
COPIES = 8


def graph_time(fn, reps: int = 3) -> float:
    """Seconds per call of fn(i) for i over the weight copies, replayed from a CUDA graph."""
    for i in range(COPIES):
        fn(i)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            for i in range(COPIES):
                fn(i)
    g.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / (reps * COPIES))
    return sorted(times)[len(times) // 2]


def copy_bandwidth() -> float:
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        b.copy_(a)
    end.record()
    end.synchronize()
    return 2 * a.numel() * 10 / (start.elapsed_time(end) / 1e3)  # bytes read + written a second


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_linear_out"))
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    bw = copy_bandwidth()
    card = torch.cuda.get_device_name()
    sweep = [tm._cfg(dot, bn, bk, w, st) for dot, bn, bk, w, st in itertools.product(
        (False, True), (16, 32, 64), (128, 256, 512), (4,), (3, 4))]
    rows_out = []
    print(f"{card}: copy bandwidth {bw / 1e9:.0f} GB/s")
    print(f"{'shape':<12} {'M':>3} {'cuBLAS us':>10} {'best us':>8} {'floor':>6} {'ratio':>6}  best config")
    for name, (n, k) in SHAPES.items():
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(COPIES)]
        floor_s = n * k * 2 / bw
        for m in args.rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x.float(), ws[0].float())
            cublas = graph_time(lambda i, x=x, ws=ws: F.linear(x, ws[i]))
            results = []
            for cfg in sweep:
                if not cfg["DOT"] and m > 1:
                    continue
                try:
                    y = tm.linear(x, ws[0], config=cfg)
                except Exception as e:  # noqa: BLE001 - e.g. out of shared memory: not a candidate
                    results.append({"config": cfg, "error": repr(e)[:120], "ok": False})
                    continue
                err = ((y.float() - ref).norm() / ref.norm()).item()
                if not err < 1e-2:
                    results.append({"config": cfg, "error": err, "ok": False})
                    continue
                t = graph_time(lambda i, x=x, ws=ws, cfg=cfg: tm.linear(x, ws[i], config=cfg))
                results.append({"config": cfg, "s": t, "error": err, "ok": True})
            good = [r for r in results if r["ok"]]
            best = min(good, key=lambda r: r["s"]) if good else None
            rows_out.append({"shape": name, "n": n, "k": k, "m": m, "cublas_s": cublas, "floor_s": floor_s,
                             "best": best, "all": results})
            if best:
                print(f"{name:<12} {m:>3} {cublas * 1e6:>10.2f} {best['s'] * 1e6:>8.2f} "
                      f"{floor_s / best['s']:>6.0%} {cublas / best['s']:>5.2f}x  {best['config']}")
            else:
                print(f"{name:<12} {m:>3} {cublas * 1e6:>10.2f}  no config passed")
    out = {"card": card, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
           "copy_bandwidth_Bps": bw, "rows": rows_out}
    tag = "H200" if "H200" in card else "H100" if "H100" in card else "gpu"
    with open(os.path.join(args.out, f"linear_{tag}.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
