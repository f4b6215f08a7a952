#!/usr/bin/env python
"""Peak host memory while a checkpoint loads with quantization at load, against the bf16 and quantized sizes.

    python benchmarks/quant_load_memory.py [--model DIR] [--methods bf16,int8,int4,fp8,fp8-block]
                                           [--dummy-17b int4] [--out benchmarks/results/quant_load_memory_<date>.json]

1. Without --model, writes a bf16 checkpoint of Param2-17B's shapes cut to 2 layers (the dense layer, one MoE
   layer of 64 experts; 1.2B parameters, 2.4 GB) with `param2moe.writer` into a temporary folder.
2. Loads it once per method (bf16: no quantization) in a fresh process with `load_model` (memory-mapped
   safetensors, each tensor quantized as it arrives), sampling /proc/self/status every 2 ms (proc_memory.py):
   peak RSS, and peak anonymous RSS (RssAnon: the process's own memory; RssFile counts the checkpoint's file
   pages mapped while they are read, page cache the kernel can drop). Also: load seconds and the model's weight bytes.
3. The weight bytes of the whole Param2-17B-A2.4B per method, from a model built on the meta device.
4. --dummy-17b METHOD[,METHOD]: loads the 17B model with dummy weights in that format (`--load-format dummy
   --preset param2-17b`) in a fresh process and reports its peak memory (int4 ~9.5 GB, int8 ~17.5 GB).
Prints a table and writes JSON with the machine and the date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

CUT = {"num_hidden_layers": 2}  # Param2-17B's shapes, 2 layers: the dense one and one MoE layer

_CHILD = r"""
import json, resource, sys, time
from proc_memory import PeakSampler
sampler = PeakSampler(("VmRSS", "RssAnon")).start()  # from before torch's import to the end
import torch
from param2moe.checkpoint import load_model
from param2moe.quant.loading import quantized_weights
path, method, dummy, preset = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4]
config = None
if dummy:
    from param2moe.writer import preset_config
    config = preset_config(preset)
time.sleep(0.05)
base = dict(sampler.peak)
t = time.perf_counter()
model = load_model(None if dummy else path, torch.bfloat16, config=config, dummy=dummy, progress=False,
                   quantization=None if method == "bf16" else method)
seconds = time.perf_counter() - t
time.sleep(0.05)
weights = sum(p.numel() * p.element_size() for p in model.parameters())
weights += sum(qw.nbytes() for *_, qw in quantized_weights(model))
maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
sampler.stop()
print(json.dumps({"method": method, "load_s": seconds, "peak_rss": sampler.peak["VmRSS"],
                  "peak_anon": sampler.peak["RssAnon"], "rss_before_load": base["VmRSS"], "ru_maxrss": maxrss,
                  "weight_bytes": weights}))
"""


def measure(path: str | None, method: str, dummy_preset: str | None = None) -> dict:
    args = [sys.executable, "-c", _CHILD, path or "", method, "1" if dummy_preset else "0", dummy_preset or ""]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "benchmarks"),
                                                       os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(args, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{method}: the loading process failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def weights_17b() -> dict[str, int]:
    """Weight bytes of the whole Param2-17B-A2.4B per method (built on the meta device: nothing allocated)."""
    import torch

    from param2moe.model import Param2MoEForCausalLM
    from param2moe.quant.loading import quantized_weights
    from param2moe.quant.plan import OPTIONS, QuantPlan
    from param2moe.writer import preset_config

    cfg, out = preset_config("param2-17b"), {}
    for method in ("bf16", *OPTIONS):
        with torch.device("meta"):
            model = Param2MoEForCausalLM(cfg, torch.bfloat16, quant=None if method == "bf16" else QuantPlan(method))
        out[method] = sum(p.numel() * p.element_size() for p in model.parameters()) + \
            sum(qw.nbytes() for *_, qw in quantized_weights(model))
    return out


def _checkpoint_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def machine() -> dict:
    facts = {"python": platform.python_version(), "platform": platform.platform(), "cores": os.cpu_count()}
    try:
        facts["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                            if line.startswith("model name"))
        facts["mem_total_gb"] = int(next(line.split()[1] for line in open("/proc/meminfo")
                                         if line.startswith("MemTotal"))) / 1e6
        facts["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                         cwd=ROOT).stdout.strip()
    except (OSError, StopIteration):
        pass
    import torch

    facts["torch"] = torch.__version__
    return facts


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a bf16 checkpoint folder (default: write the 2-layer cut)")
    p.add_argument("--methods", default="bf16,int8,int4,fp8,fp8-block")
    p.add_argument("--dummy-17b", default="", help="also load the 17B dummy model in these formats (comma list)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    date = datetime.date.today().isoformat()
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"quant_load_memory_{date}.json")
    result = {"date": date, "machine": machine(), "command": " ".join(sys.argv), "rows": [], "dummy_17b": [],
              "load_average_start": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if not args.methods:
            pass
        elif path is None:
            from param2moe.writer import preset_config, write_checkpoint

            path = os.path.join(tmp, "cut")
            print("writing a 2-layer bf16 checkpoint of Param2-17B's shapes ...", flush=True)
            write_checkpoint(path, preset_config("param2-17b", CUT), seed=0)
            result["checkpoint"] = {"preset": "param2-17b", "overrides": CUT}
        if args.methods:
            result["checkpoint_bytes"] = _checkpoint_bytes(path)
            print(f"checkpoint: {result['checkpoint_bytes'] / 1e9:.2f} GB of safetensors")
            print(f"{'method':>10} {'load s':>7} {'weights GB':>11} {'peak RSS GB':>12} {'peak anon GB':>13}")
        for method in filter(None, args.methods.split(",")):
            row = measure(path, method)
            result["rows"].append(row)
            print(f"{method:>10} {row['load_s']:>7.1f} {row['weight_bytes'] / 1e9:>11.2f} "
                  f"{row['peak_rss'] / 1e9:>12.2f} {row['peak_anon'] / 1e9:>13.2f}", flush=True)
    result["weights_17b"] = weights_17b()
    print("Param2-17B-A2.4B weights: " + ", ".join(f"{m} {b / 1e9:.2f} GB" for m, b in result["weights_17b"].items()))
    for method in filter(None, args.dummy_17b.split(",")):
        row = measure(None, method, dummy_preset="param2-17b")
        result["dummy_17b"].append(row)
        print(f"17B dummy {method}: load {row['load_s']:.0f} s, weights {row['weight_bytes'] / 1e9:.2f} GB, peak RSS "
              f"{row['peak_rss'] / 1e9:.2f} GB (anon {row['peak_anon'] / 1e9:.2f})", flush=True)
    result["load_average_end"] = os.getloadavg()  # a shared machine slows the loads down, not their memory
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
