#!/usr/bin/env python
"""A CPU process's memory with the weights memory-mapped (the default) and copied (--no-mmap-weights), beside
llama.cpp's with its weights mapped and read in, on cpu_bench.py's 46.7M checkpoint in bf16, in one run.

    python benchmarks/cpu_memory.py [--ckpt DIR] [--repeats 2] [--out benchmarks/results/cpu_memory_DATE.json]

Ours: a fresh process per mode (`LLM(..., mmap_weights=...)`, KV cache 32 MiB, one 128-token prompt, 64 tokens
generated), /proc/self/status after `import torch`, after loading and after generating: VmRSS (resident), RssAnon
(the process's own memory), RssFile (file pages it maps: the mapped weights, shared with the page cache and other
processes), VmHWM (peak resident); the load's seconds, the first token's and a decode step's milliseconds.
llama.cpp (when `llamacpp_compare.py build` has run): the checkpoint converted to a BF16 GGUF, `llama-bench -p 128
-n 64 -r 1 -lm mmap|none` (its weights mapped, or read into its memory), its peak resident memory (getrusage of the
child). Linux only.
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

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

_CHILD = r"""
import json, sys, time
import torch
from proc_memory import status

torch.set_num_threads(int(sys.argv[3]))
stages = {"torch imported": status()}
from param2moe import LLM, SamplingParams
t0 = time.perf_counter()
llm = LLM(sys.argv[1], max_model_len=512, max_num_seqs=1, kv_cache_memory=32 << 20, mmap_weights=sys.argv[2] == "1")
load_s = time.perf_counter() - t0
stages["loaded"] = status()
params = SamplingParams(max_tokens=64, ignore_eos=True)
llm.generate([[7] * 128], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)  # warm-up
t0 = time.perf_counter()
llm.generate([[5] * 128], SamplingParams(max_tokens=1, ignore_eos=True), use_tqdm=False)
ttft = time.perf_counter() - t0
t0 = time.perf_counter()
llm.generate([[3] * 128], params, use_tqdm=False)
total = time.perf_counter() - t0
stages["generated"] = status()
print(json.dumps({"stages": stages, "load_s": load_s, "ttft_ms": ttft * 1e3,
                  "decode_ms": (total - ttft) * 1e3 / 63}))
"""


def ours(ckpt: str, mmap: bool, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join([HERE, os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", _CHILD, ckpt, str(int(mmap)), str(threads)], capture_output=True,
                       text=True, env=env, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def llama(gguf: str, mode: str, threads: int) -> dict:
    import llamacpp_compare as lc

    cmd = [lc.tool("llama-bench"), "-m", gguf, "-t", str(threads), "-p", "128", "-n", "64", "-r", "1", "-lm", mode,
           "-o", "json"]
    # the peak resident memory of this child alone: a fresh process measures it and reports it
    probe = ("import json, resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, "
             "text=True, check=True); print(json.dumps({'maxrss': resource.getrusage(resource.RUSAGE_CHILDREN)"
             ".ru_maxrss * 1024, 'out': r.stdout}))")
    r = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True, check=True)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    runs = json.loads(res["out"])
    return {"peak_rss": res["maxrss"], "tok_s": {("pp128" if x["n_prompt"] else "tg64"): x["avg_ts"] for x in runs}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", help="a bf16 checkpoint (default: cpu_bench.py's 46.7M one, written to a temp folder)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each mode, alternating; the lowest memory kept")
    ap.add_argument("--out", help="JSON results (default: benchmarks/results/cpu_memory_DATE.json)")
    a = ap.parse_args()
    import cpu_bench

    rows: dict[str, list] = {}
    with tempfile.TemporaryDirectory(prefix="p2m-cpu-memory-") as tmp:
        ckpt = a.ckpt or os.path.join(tmp, "ckpt")
        if not a.ckpt:
            cpu_bench.write_model(ckpt, "bfloat16", seed=0)
        weights = sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt) if f.endswith(".safetensors"))
        gguf = None
        try:
            import llamacpp_compare as lc

            lc.tool("llama-bench")
            gguf = lc.convert(ckpt, tmp, "bf16", "gpt-2")
        except (SystemExit, ImportError, subprocess.CalledProcessError) as e:
            print(f"llama.cpp not run: {e}")
        for _ in range(a.repeats):
            for mmap in (True, False):
                rows.setdefault(f"param2moe {'mapped' if mmap else 'copied'}", []).append(ours(ckpt, mmap, a.threads))
            if gguf:
                for mode in ("mmap", "none"):
                    rows.setdefault(f"llama.cpp -lm {mode}", []).append(llama(gguf, mode, a.threads))
    mib = 1 << 20
    print(f"weights: {weights / mib:.1f} MiB\n")
    print(f"{'':<22} {'peak RSS':>8} {'RSS':>6} {'anon':>6} {'file':>6} {'load s':>6} {'TTFT ms':>7} {'ms/tok':>6}")
    summary = {}
    for name, runs in rows.items():
        if name.startswith("param2moe"):
            best = min(runs, key=lambda r: r["stages"]["generated"]["RssAnon"])
            g = best["stages"]["generated"]
            summary[name] = {"peak_rss": g["VmHWM"], "rss": g["VmRSS"], "anon": g["RssAnon"], "file": g["RssFile"],
                             "load_s": min(r["load_s"] for r in runs), "ttft_ms": min(r["ttft_ms"] for r in runs),
                             "decode_ms": min(r["decode_ms"] for r in runs)}
            s = summary[name]
            print(f"{name:<22} {s['peak_rss'] / mib:>8.1f} {s['rss'] / mib:>6.1f} {s['anon'] / mib:>6.1f} "
                  f"{s['file'] / mib:>6.1f} {s['load_s']:>6.2f} {s['ttft_ms']:>7.1f} {s['decode_ms']:>6.2f}")
        else:
            summary[name] = {"peak_rss": min(r["peak_rss"] for r in runs)}
            print(f"{name:<22} {summary[name]['peak_rss'] / mib:>8.1f}")
    result = {"date": time.strftime("%F"), "machine": {"platform": platform.platform(), "cores": os.cpu_count(),
              "python": platform.python_version()}, "weights_bytes": weights, "summary": summary, "runs": rows,
              "command": " ".join(sys.argv)}
    try:
        result["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                          cwd=HERE).stdout.strip()
        import torch

        result["torch"] = torch.__version__
    except OSError:
        pass
    out = a.out or os.path.join(HERE, "results", f"cpu_memory_{result['date']}.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
