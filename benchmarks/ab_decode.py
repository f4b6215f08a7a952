#!/usr/bin/env python
"""A/B of decode-step variants in one process, on one engine (dummy Param2-17B weights, experts chosen
uniformly at random, docs/model.md §7): for each variant the decode graphs are captured again and `bench latency`'s
measurement runs (median engine step over 128 steps after a 128-token prompt, and the graph's replay time).

    python benchmarks/ab_decode.py [--batch 1 4] [--variants base,cublas-projections] [--json out.json]

A variant is a set of module attributes (kernel switches) set before its graphs are captured; every other
variant's switches are back at their defaults. To try a kernel change, add its switch to VARIANTS.
This session's experiments (their switches removed with the code they switched) are in
benchmarks/results/h100_2026-11-26f/ab/README.md.
"""

from __future__ import annotations

import argparse
import json

import torch

from param2moe.bench import bench_latency, copy_bandwidth, machine_facts
from param2moe.engine import EngineConfig, LLMEngine
from param2moe.kernels.triton import gemv as tri_gemv

VARIANTS = {  # name -> module attributes set for it: (module, attribute, value)
    "base": [],
    "cublas-projections": [(tri_gemv, "_ENABLED", False)],  # attention's qkv/dense through cuBLAS, not the GEMV
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--rounds", type=int, default=2, help="each variant measured this many times, interleaved")
    ap.add_argument("--json")
    args = ap.parse_args()
    engine = LLMEngine(EngineConfig(preset="param2-17b", load_format="dummy", max_model_len=4096,
                                    max_num_seqs=max(8, max(args.batch))))
    runner = engine.runner
    defaults = [(m, a, getattr(m, a)) for sets in VARIANTS.values() for m, a, _ in sets]
    bw = copy_bandwidth("cuda")
    rows = []
    for r in range(args.rounds):
        for name in args.variants.split(","):
            for module, attr, value in defaults:
                setattr(module, attr, value)
            for module, attr, value in VARIANTS[name]:
                setattr(module, attr, value)
            runner.graphs = None
            torch.cuda.synchronize()
            runner.enable_cuda_graphs(engine.config.max_num_seqs, 4096, 0, engine.sampler.greedy)
            for b in args.batch:
                row = bench_latency(engine, b, 128, 128)
                row.update(variant=name, round=r, floor_s=row["floor_bytes"] / bw)
                row["share_of_floor"] = row["floor_s"] / row["itl_s"]
                rows.append(row)
                print(f"{name:<16} round {r} batch {b:>3}: step {row['itl_s'] * 1e3:.3f} ms, graph "
                      f"{row['graph_gpu_s'] * 1e3:.3f} ms, {row['share_of_floor']:.1%} of the floor", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_facts("cuda"), "copy_bandwidth_GBps": bw / 1e9, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
