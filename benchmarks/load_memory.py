"""Peak host memory while a checkpoint loads, against the size of its weights.

Writes a checkpoint of a few hundred MB with the writer (one file, and the same weights in shards), then
loads each in a fresh interpreter (`checkpoint.load_model` onto the CPU, the checkpoint's dtype) while a
thread samples /proc/self/status every 2 ms (proc_memory.py): VmRSS (all resident pages), RssAnon (private memory: the
model's parameters, temporaries) and RssFile (pages of the memory-mapped safetensors files while mapped;
page cache, which the kernel can drop). Figures are the peaks during loading, less what the interpreter held
before it (imports). Linux only.

    python benchmarks/load_memory.py [--layers 6] [--out benchmarks/results/load_memory_DATE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

_CHILD = r"""
import json, resource, sys, time
import torch
from param2moe.checkpoint import load_model
from proc_memory import PeakSampler, status

with PeakSampler() as sampler:
    t0 = time.perf_counter()
    model = load_model(sys.argv[1], dtype=getattr(torch, sys.argv[2]), device="cpu", progress=False)
    seconds = time.perf_counter() - t0
params = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"before": sampler.before, "peak": sampler.peak, "after": status(sampler.keys),
                  "seconds": seconds, "param_bytes": params,
                  "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def checkpoint_config(layers: int):
    from param2moe.writer import preset_config

    # Param2's layout at a few hundred MB in bf16: 32 experts of width 512 at hidden 1024 are 100 MB a layer.
    return preset_config("small", {"hidden_size": 1024, "num_hidden_layers": layers, "num_attention_heads": 8,
                                   "num_key_value_heads": 2, "head_dim": 128, "intermediate_size": 2048,
                                   "num_experts": 32, "moe_intermediate_size": 512,
                                   "moe_shared_expert_intermediate_size": 1024, "vocab_size": 32000})


def measure(path: str, dtype: str) -> dict:
    here = os.path.dirname(os.path.abspath(__file__))  # proc_memory.py, for the child
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [here, os.path.dirname(here), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _CHILD, path, dtype], capture_output=True, text=True, env=env,
                          check=True)
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    weight_bytes = sum(os.path.getsize(os.path.join(path, f)) for f in files)
    row = {"files": len(files), "dtype": dtype, "weight_bytes": weight_bytes, "param_bytes": r["param_bytes"],
           "seconds": r["seconds"]}
    for key in ("VmRSS", "RssAnon", "RssFile"):
        row[f"peak_{key}_over_start"] = r["peak"][key] - r["before"][key]
    row["peak_rss_over_weights"] = row["peak_VmRSS_over_start"] / weight_bytes
    row["peak_anon_over_params"] = row["peak_RssAnon_over_start"] / r["param_bytes"]
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--out", default=None, help="JSON results (default: benchmarks/results/load_memory_DATE.json)")
    args = ap.parse_args()
    from param2moe.writer import write_checkpoint

    rows = []
    cfg = checkpoint_config(args.layers)
    with tempfile.TemporaryDirectory() as tmp:
        one, sharded = os.path.join(tmp, "one"), os.path.join(tmp, "sharded")
        write_checkpoint(one, cfg, seed=0)
        write_checkpoint(sharded, cfg, seed=0, shard_bytes=100 << 20)
        for path, dtype in ((one, "bfloat16"), (sharded, "bfloat16"), (one, "float32")):
            rows.append(measure(path, dtype))
    mb = 1 << 20
    print(f"{'files':>5} {'dtype':>9} {'weights MB':>10} {'params MB':>9} {'peak RSS':>9} {'anon':>7} {'file':>7} "
          f"{'RSS/weights':>11} {'anon/params':>11} {'s':>5}")
    for r in rows:
        print(f"{r['files']:>5} {r['dtype']:>9} {r['weight_bytes'] / mb:>10.0f} {r['param_bytes'] / mb:>9.0f} "
              f"{r['peak_VmRSS_over_start'] / mb:>9.0f} {r['peak_RssAnon_over_start'] / mb:>7.0f} "
              f"{r['peak_RssFile_over_start'] / mb:>7.0f} {r['peak_rss_over_weights']:>11.2f} "
              f"{r['peak_anon_over_params']:>11.2f} {r['seconds']:>5.1f}")
    result = {"date": time.strftime("%F"), "machine": {"platform": platform.platform(), "cpu": platform.machine(),
              "cores": os.cpu_count(), "python": platform.python_version()},
              "config": {"layers": args.layers}, "rows": rows}
    try:
        result["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                          text=True).stdout.strip()
    except OSError:
        pass
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"load_memory_{result['date']}.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
