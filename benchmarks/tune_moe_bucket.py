#!/usr/bin/env python
"""Quick retune of the fused MoE's block sizes at a few decode token counts, on the GPU at hand.

    python benchmarks/tune_moe_bucket.py 128 256 [--out tune.json]

Param2-17B shapes (64 routed experts + the shared expert folded in as 2 more, hidden 2048, width 2048, top
6 + 2), bf16, experts chosen uniformly at random. For each token count: the committed config, then gate/up
tiles (down fixed), then down tiles (the best gate/up), then BLOCK_M 16 / 64; each timed as a CUDA graph of
the whole `moe_experts` (align, gate/up, down) by gpu_timing.graph_us. Prints every time and the best; writes
them all as JSON.
(`benchmarks/gpu_kernels.py` is the full sweep that made the committed table; this is its short form, used
for the 128 and 256 buckets in `benchmarks/results/h100_2026-11-26e/ab/call14_tune_moe_128_256.json`.)
"""

from __future__ import annotations

import argparse
import json

import torch
from gpu_timing import graph_us

from param2moe.kernels.triton import moe as tri_moe

E, HIDDEN, WIDTH, ROUTED, TOPK = 66, 2048, 2048, 64, 8
GATE_UP = [(64, 128, 4, 3), (64, 128, 4, 4), (128, 128, 4, 3), (128, 64, 4, 4), (64, 256, 4, 3), (128, 128, 8, 3),
           (128, 64, 8, 4), (256, 64, 8, 3)]
DOWN = [(128, 128, 8, 3), (64, 128, 4, 4), (128, 64, 4, 4), (64, 256, 4, 3), (128, 128, 4, 3), (256, 64, 8, 3),
        (128, 64, 8, 4)]


def tiles(bn: int, bk: int, warps: int, stages: int) -> dict:
    return {"BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 1, "num_warps": warps, "num_stages": stages}


def time_us(t: int, cfg: dict, w13, w2) -> float:
    dev, dt = w13.device, w13.dtype
    x = torch.randn(t, HIDDEN, device=dev).to(dt)
    routed = torch.rand(t, ROUTED, device=dev).topk(TOPK - 2).indices
    ids = torch.cat([routed, torch.tensor([[ROUTED, ROUTED + 1]], device=dev).expand(t, 2)], 1).contiguous()
    weights = torch.rand(t, TOPK, device=dev)

    def step():
        tri_moe.moe_experts(x, w13, w2, weights, ids, config=cfg, unsummed=True)

    for _ in range(3):  # compile
        step()
    return graph_us([step], rep=40)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("tokens", type=int, nargs="+")
    ap.add_argument("--out", default="tune_moe_bucket.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    w13 = (torch.randn(E, 2 * WIDTH, HIDDEN, device="cuda") * 0.02).to(torch.bfloat16)
    w2 = (torch.randn(E, HIDDEN, WIDTH, device="cuda") * 0.02).to(torch.bfloat16)
    results = {}

    def trial(t: int, label: str, cfg: dict) -> float:
        try:
            us = time_us(t, cfg, w13, w2)
        except Exception as e:  # noqa: BLE001 - a config that does not fit (shared memory) is skipped
            print(t, label, "failed:", str(e)[:120], flush=True)
            return float("inf")
        results[f"{t} {label} {json.dumps(cfg)}"] = us
        print(t, label, f"{us:.1f} us", cfg, flush=True)
        return us

    for t in args.tokens:
        table = tri_moe.get_config(t, E, HIDDEN, WIDTH, TOPK, torch.bfloat16)
        best, best_cfg = trial(t, "table", table), table
        for name, options in (("gate_up", GATE_UP), ("down", DOWN)):
            for option in options:
                cfg = dict(best_cfg, **{name: tiles(*option)})
                us = trial(t, name, cfg)
                if us < best:
                    best, best_cfg = us, cfg
        for block_m in (16, 64):
            cfg = dict(best_cfg, BLOCK_M=block_m)
            us = trial(t, f"BLOCK_M {block_m}", cfg)
            if us < best:
                best, best_cfg = us, cfg
        print(t, f"best {best:.1f} us", json.dumps(best_cfg), flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
