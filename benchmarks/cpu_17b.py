#!/usr/bin/env python
"""Param-2 17B's real shapes on this CPU machine (issue 19 item 3): dummy weights quantized at load.

    python benchmarks/cpu_17b.py --quantization int4 [--batch-sizes 1 4 16] [--output-len 8] [--prompt-len 512]
                                 [--serve] [--out benchmarks/results/cpu_17b_<method>_<date>.json]

One process: the engine of `param2moe bench --preset param2-17b --load-format dummy --quantization M` (bf16
activations), its load time and peak RSS (sampled from /proc/self/status every 5 ms by proc_memory.py, and
ru_maxrss), then
`param2moe.bench.bench_latency` rows:
  - decode at each --batch-sizes (a --decode-input-len prompt, --output-len tokens; median step), with the dummy
    weights' uniformly random expert choice (docs/model.md §7: the experts a real model's batch touches);
  - the first token of one --prompt-len prompt (median of bench.TTFT_REPEATS prefills);
  - batch-1 decode again with the router's own choice (`--routing model`): the path a real checkpoint takes,
    where the fused CPU decode layer runs every layer (it declines the benchmarks' random choice).
--serve: afterwards (engine freed), `param2moe serve` with the same options in a fresh process answers one
/v1/completions request (16 token ids: a dummy preset has no tokenizer; start-up seconds and the reply
recorded), then is stopped.
Prints the rows and writes JSON with the machine, the date, the commit and the command.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import resource
import subprocess
import sys
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import cpu_bench  # noqa: E402  (machine facts)
from proc_memory import PeakSampler, status  # noqa: E402


def engine_args(a) -> list[str]:
    args = ["--preset", a.preset, "--load-format", "dummy", "--dtype", "bfloat16", "--max-model-len",
            str(a.max_model_len), "--max-num-seqs", str(max(a.batch_sizes)), "--kv-cache-memory", str(a.kv_bytes)]
    return args + (["--quantization", a.quantization] if a.quantization else [])


def measure(a) -> dict:
    from param2moe import bench
    from param2moe.cli import build_parser

    sampler = PeakSampler(("VmRSS",), interval=0.005).start()
    bench.TTFT_REPEATS = a.ttft_repeats
    args = build_parser().parse_args(["bench", "latency", *engine_args(a)])
    rss0 = sampler.peak["VmRSS"]
    t = time.perf_counter()
    engine = bench._engine(args)
    load_s = time.perf_counter() - t
    after_load = {"peak_rss": sampler.peak["VmRSS"],
                  "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    print(f"loaded in {load_s:.1f} s, peak RSS {after_load['peak_rss'] / 2**30:.2f} GiB", flush=True)
    rows = []

    def row(engine, kind, batch, input_len, output_len):
        r = bench.bench_latency(engine, batch, input_len, output_len)
        r["kind"] = kind
        rows.append(r)
        print(f"{kind:>16} batch {batch:>2} input {input_len:>4}: TTFT {r['ttft_s'] * 1e3:9.1f} ms, step "
              f"{r['itl_s'] * 1e3:8.1f} ms ({r['tok_per_s']:.2f} tok/s)", flush=True)

    for b in a.batch_sizes:
        row(engine, "decode", b, a.decode_input_len, a.output_len)
    row(engine, "first_token", 1, a.prompt_len, 2)
    engine.model.set_uniform_random_routing(False)
    engine.config.uniform_random_routing = False
    row(engine, "decode_router", 1, a.decode_input_len, a.output_len)
    sampler.stop()
    peak = sampler.peak["VmRSS"]
    del engine
    gc.collect()
    print(f"engine freed: RSS {status(('VmRSS',))['VmRSS'] / 2**30:.2f} GiB", flush=True)
    return {"rss_before_load": rss0, "load_s": load_s, "after_load": after_load, "rows": rows,
            "peak_rss": peak, "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def serve_once(a) -> dict:
    """`param2moe serve` with the engine's options answers one completion; start-up time and the reply."""
    port = 8731
    cmd = [os.path.join(os.path.dirname(sys.executable), "param2moe"), "serve", *engine_args(a), "--port",
           str(port)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                return {"ok": False, "command": " ".join(cmd), "error": proc.stderr.read()[-2000:]}
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(1)
        ready_s = time.perf_counter() - t0
        with urllib.request.urlopen(base + "/v1/models", timeout=10) as r:
            model = json.load(r)["data"][0]["id"]
        body = json.dumps({"model": model, "prompt": list(range(100, 116)), "max_tokens": 8, "temperature": 0})
        req = urllib.request.Request(base + "/v1/completions", body.encode(), {"Content-Type": "application/json"})
        t = time.perf_counter()
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                reply = json.load(r)
        except urllib.error.HTTPError as e:
            return {"ok": False, "command": " ".join(cmd), "ready_s": ready_s, "status": e.code,
                    "error": e.read().decode()[-2000:]}
        return {"ok": True, "command": " ".join(cmd), "ready_s": ready_s, "request_s": time.perf_counter() - t,
                "usage": reply.get("usage"), "finish_reason": reply["choices"][0].get("finish_reason"),
                "text": reply["choices"][0].get("text")}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="param2-17b")
    ap.add_argument("--quantization", default="int4", help="int8, int4, or '' for bf16")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--decode-input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--ttft-repeats", type=int, default=3)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--kv-bytes", type=int, default=1 << 30)
    ap.add_argument("--serve", action="store_true")
    ap.add_argument("--out")
    a = ap.parse_args()
    t0 = time.time()
    res = measure(a)
    if a.serve:
        res["serve"] = serve_once(a)
        print("serve:", json.dumps(res["serve"]), flush=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    doc = {"date": now.isoformat(timespec="seconds"), "git_commit": cpu_bench._sh(["git", "-C", ROOT, "rev-parse",
                                                                                   "HEAD"]),
           "command": " ".join([os.path.relpath(sys.executable), *sys.argv]), "machine": cpu_bench.machine(),
           "threads": int(os.environ.get("OMP_NUM_THREADS", os.cpu_count())), "loadavg_end": cpu_bench.loadavg(),
           "elapsed_s": round(time.time() - t0, 1), "engine_args": engine_args(a), **res}
    name = a.quantization or "bf16"
    out = a.out or os.path.join(ROOT, "benchmarks", "results", f"cpu_17b_{name}_{now:%Y-%m-%d}.json")
    with open(out, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()
