#!/usr/bin/env python
"""The fused norm + router + top-k launch at one token (kernels/triton/routing.py) by shape: programs of 1/2/4/8
experts, 1/2/4/8 warps; microseconds a launch, 50 back to back in a CUDA graph (gpu_timing), and whether the
expert ids match the default's. On a GPU: `OUT=DIR python benchmarks/router_sweep.py` (writes
DIR/router_sweep.json); the engine's step with a shape: benchmarks/results/h100_2026-12-06f/call4.sh."""
import json
import os
import sys

import torch
from gpu_timing import graph_us

sys.path.insert(0, os.getcwd())
import param2moe.kernels.triton.routing as r

H, E, dev = 2048, 64, "cuda"
g = torch.Generator(device=dev).manual_seed(0)
x = torch.randn(1, H, device=dev, generator=g).to(torch.bfloat16)
res = torch.randn(1, H, device=dev, generator=g).to(torch.bfloat16)
nw = torch.ones(H, dtype=torch.bfloat16, device=dev)
gate = torch.randn(E, H, device=dev, generator=g) * 0.02
bias = torch.randn(E, device=dev, generator=g) * 0.01
kw = dict(score_function="sigmoid", n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5,
          num_appended=2)


def timed(per, warps):
    r.EXPERTS_PER_PROGRAM, r.ROUTER_WARPS = per, warps
    f = lambda: r.add_rms_norm_gate_route(x, res, nw, 1e-6, gate, bias, 6, **kw)
    for _ in range(3):
        out = f()
    return graph_us([f] * 50), [o.clone() for o in out]


rows = {}
ref = timed(2, 4)[1]
for per in (1, 2, 4, 8):
    for warps in (1, 2, 4, 8):
        us, out = timed(per, warps)
        same_ids = torch.equal(out[3], ref[3])
        dw = (out[2] - ref[2]).abs().max().item()
        rows[f"per{per}_w{warps}"] = {"us": us, "same_ids": same_ids, "max_weight_diff": dw}
        print(f"per {per} warps {warps}: {us:.2f} us  ids same {same_ids}  weights diff {dw:.2e}", flush=True)
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "router_sweep.json"), "w"), indent=1)
