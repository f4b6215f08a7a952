#!/usr/bin/env python
"""CPU benchmark: param2moe against vLLM's CPU build on the same checkpoint, in one run.

    python benchmarks/cpu_bench.py [--vllm-python /work/vllm-venv/bin/python] [--dtype bfloat16,float32]
                                   [--num-requests 64 --input-len 128 --output-len 128] [--repeats 2]

1. Writes a checkpoint of the Param2 layout with `param2moe.writer` (preset "small", scaled up: see
   MODEL below; 46.7M parameters) into a temporary folder, in --dtype (default bfloat16, Param2's own;
   float32, or both one after the other). Both engines load that folder and run in that dtype, with the
   writer's router (real routing: the same weights and the same work for both).
2. For each engine, in a fresh process (ours with this interpreter, vLLM with --vllm-python):
   - start-up: from just before the process is launched to the first token of a 16-token prompt
     (imports, engine construction, weight loading, first step);
   - latency at batch 1: a --input-len prompt with max_tokens 1 (time to first token) and with
     --latency-output-len tokens; the difference over the extra tokens is the time per output token;
   - offline throughput: --num-requests prompts of --input-len random token ids, --output-len greedy
     tokens each (ignore_eos), one generate() call; output tokens/s and all tokens/s.
   Latency and throughput are timed after a warm-up batch of the measured shape (4 output tokens).
   Same settings for both: max_num_seqs, max_num_batched_tokens, max_model_len, KV cache bytes, prefix
   caching off, detokenization on; vLLM in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0, uni executor,
   enforce_eager).
3. Prints a table and writes benchmarks/results/cpu_bench_<date>.json with the machine (lscpu model,
   cores, load before and after), the date, the git commit and the command line.

The engines run one after the other (never at the same time); with --repeats N each measurement is
taken N times, alternating engines, and the best is kept (the machine may be shared).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # param2moe from this checkout, installed or not
    sys.path.insert(0, ROOT)

# Param2's layout (docs/model.md §1: dense first layer, sigmoid routing with expert bias, n_group=1/topk_group=1,
# 2 shared experts whose width is the total, QK-norm, tied head, theta 1e6) at ~47M parameters.
MODEL = dict(vocab_size=8192, hidden_size=512, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2,
             head_dim=64, intermediate_size=2048, moe_intermediate_size=256, num_experts=16,
             num_experts_per_tok=4, num_shared_experts=2, moe_shared_expert_intermediate_size=512,
             first_k_dense_replace=1, max_position_embeddings=2048)
STARTUP_PROMPT_LEN = 16


# ================================================================== worker side (runs in either venv)
def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(25, vocab) for _ in range(length)] for _ in range(n)]


class _Ours:
    name = "param2moe"

    def __init__(self, a):
        from param2moe import LLM, SamplingParams

        self.SamplingParams = SamplingParams
        kw = {"quantization": a.quantization, "quantize_head": a.quantize_head} if a.quantization else {}
        kw["mmap_weights"] = not a.no_mmap_weights
        self.llm = LLM(a.ckpt, dtype=a.dtype, max_model_len=a.max_model_len, max_num_seqs=a.max_num_seqs,
                       max_num_batched_tokens=a.max_num_batched_tokens, kv_cache_memory=a.kv_gib << 30,
                       enable_prefix_caching=False, seed=0, **kw)

    def generate(self, prompts, max_tokens):
        sp = self.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]


class _VLLM:
    name = "vllm"

    def __init__(self, a):
        from vllm import LLM, SamplingParams

        self.SamplingParams = SamplingParams
        self.llm = LLM(model=a.ckpt, dtype=a.dtype, max_model_len=a.max_model_len, max_num_seqs=a.max_num_seqs,
                       max_num_batched_tokens=a.max_num_batched_tokens, enable_prefix_caching=False, seed=0,
                       distributed_executor_backend="uni", enforce_eager=True, trust_remote_code=True)

    def generate(self, prompts, max_tokens):
        sp = self.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]


def worker(a) -> None:
    """One engine in this process: start-up, latency, throughput; JSON to a.result."""
    engine = (_Ours if a.worker == "param2moe" else _VLLM)(a)
    built = time.time()
    first = engine.generate(_prompts(1, STARTUP_PROMPT_LEN, a.vocab, seed=1), 1)
    first_token = time.time()
    assert len(first[0]) == 1
    res = {"engine": engine.name, "startup_s": first_token - a.launch_time, "construct_s": built - a.launch_time}

    import torch

    res["torch_threads"] = torch.get_num_threads()
    # Warm-up, the same for both: a batch of the measured shape (its prefill steps are full size) with a
    # few output tokens, so that the timed runs see a process in its steady state (weights packed,
    # allocator heaps grown), as a server does after its first requests.
    engine.generate(_prompts(a.num_requests, a.input_len, a.vocab, seed=2), 4)

    def timed(prompts, max_tokens):
        """(wall seconds, process CPU seconds, outputs): CPU time as well, for a machine shared with other jobs
        (with one thread it is the time the run needed, whatever share of the core it got)."""
        t, c = time.perf_counter(), time.process_time()
        out = engine.generate(prompts, max_tokens)
        return time.perf_counter() - t, time.process_time() - c, out

    lat_prompt = _prompts(1, a.input_len, a.vocab, seed=3)
    firsts = [timed(lat_prompt, 1) for _ in range(3)]
    ttft, ttft_cpu = min(f[0] for f in firsts), min(f[1] for f in firsts)
    long_s, long_cpu, long_out = timed(lat_prompt, a.latency_output_len)
    n = a.latency_output_len - 1
    res["latency"] = {"input_len": a.input_len, "output_len": a.latency_output_len, "ttft_ms": 1e3 * ttft,
                      "tpot_ms": 1e3 * (long_s - ttft) / n, "total_s": long_s,
                      "ttft_cpu_ms": 1e3 * ttft_cpu, "tpot_cpu_ms": 1e3 * (long_cpu - ttft_cpu) / n}
    prompts = _prompts(a.num_requests, a.input_len, a.vocab, seed=4)
    elapsed, cpu, outs = timed(prompts, a.output_len)
    n_out = sum(len(o) for o in outs)
    assert n_out == a.num_requests * a.output_len
    res["throughput"] = {"num_requests": a.num_requests, "input_len": a.input_len, "output_len": a.output_len,
                         "elapsed_s": elapsed, "output_tok_s": n_out / elapsed,
                         "total_tok_s": (n_out + a.num_requests * a.input_len) / elapsed,
                         "cpu_s": cpu, "output_tok_per_cpu_s": n_out / cpu}
    res["greedy_tokens_head"] = [o[:8] for o in outs[:4]]  # to see that both engines did the same work
    with open(a.result, "w") as f:
        json.dump(res, f)


# ================================================================== driver side (runs with param2moe's venv)
def _sh(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def machine() -> dict:
    lscpu = _sh(["lscpu"])
    facts = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    facts = {k.strip(): v.strip() for k, v in facts.items()}
    return {"cpu_model": facts.get("Model name"), "cpus": os.cpu_count(),
            "cores_per_socket": facts.get("Core(s) per socket"), "threads_per_core": facts.get("Thread(s) per core"),
            "flags_bf16": "avx512_bf16" in facts.get("Flags", ""), "amx": "amx_tile" in facts.get("Flags", ""),
            "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": sys.version.split()[0]}


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


def wait_until_idle(limit_s: float, idle_share: float = 0.9) -> float:
    """Wait (up to limit_s) until the CPUs are idle >= idle_share over 3 s; return the last share seen."""
    t0, share = time.time(), 0.0
    while True:
        b0, a0 = _cpu_jiffies()
        time.sleep(3)
        b1, a1 = _cpu_jiffies()
        share = 1 - (b1 - b0) / max(1, a1 - a0)
        if share >= idle_share or time.time() - t0 > limit_s:
            return share


def write_model(out: str, dtype: str, seed: int) -> int:
    from param2moe.writer import preset_config, write_checkpoint

    config = preset_config("small", {**MODEL, "torch_dtype": dtype})
    write_checkpoint(out, config, seed=seed)
    from safetensors import safe_open

    n = 0
    for f in os.listdir(out):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(out, f), framework="pt") as st:
                n += sum(_prod(st.get_slice(k).get_shape()) for k in st.keys())
    return n


def _prod(shape) -> int:
    p = 1
    for s in shape:
        p *= s
    return p


def run_worker(engine: str, python: str, a, ckpt: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
        result = tmp.name
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if engine == "vllm":
        env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE=str(a.kv_gib))
    args = [f"--{k.replace('_', '-')}={v}" for k, v in dict(
        dtype=a.dtype, max_model_len=a.max_model_len, max_num_seqs=a.max_num_seqs,
        max_num_batched_tokens=a.max_num_batched_tokens, kv_gib=a.kv_gib, num_requests=a.num_requests,
        input_len=a.input_len, output_len=a.output_len, latency_output_len=a.latency_output_len,
        vocab=MODEL["vocab_size"]).items()]
    if getattr(a, "quantization", None):
        args.append(f"--quantization={a.quantization}")
        if getattr(a, "quantize_head", False):
            args.append("--quantize-head")
    if getattr(a, "no_mmap_weights", False):
        args.append("--no-mmap-weights")
    idle_before = wait_until_idle(a.wait_idle) if a.wait_idle else None
    load_before = loadavg()
    busy0, total0 = _cpu_jiffies()
    own0 = os.times()
    launch = time.time()
    cmd = [python, os.path.abspath(__file__), "--worker", engine, "--ckpt", ckpt, "--result", result,
           f"--launch-time={launch}", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tempfile.gettempdir())
    if proc.returncode != 0:
        raise SystemExit(f"{engine} worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    with open(result) as f:
        res = json.load(f)
    os.unlink(result)
    busy1, total1 = _cpu_jiffies()
    own1 = os.times()
    tick = os.sysconf("SC_CLK_TCK")
    own = (own1.children_user + own1.children_system - own0.children_user - own0.children_system) * tick
    res["load_before"], res["load_after"], res["idle_share_before"] = load_before, loadavg(), idle_before
    # CPU taken by other processes while the worker ran, as a share of all CPU time (0: the machine was ours).
    res["others_cpu_share"] = round(max(0.0, (busy1 - busy0 - own) / max(1, total1 - total0)), 3)
    return res


def best(runs: list[dict]) -> dict:
    """The best of each measurement over repeats (the machine is shared: slower runs are interference)."""
    out = dict(runs[0])
    out["startup_s"] = min(r["startup_s"] for r in runs)
    out["construct_s"] = min(r["construct_s"] for r in runs)
    out["latency"] = min((r["latency"] for r in runs), key=lambda x: x["tpot_ms"])
    out["throughput"] = max((r["throughput"] for r in runs), key=lambda x: x["output_tok_s"])
    out["runs"] = runs
    return out


def table(results: dict[str, dict]) -> str:
    rows = [("", *results.keys())]

    def add(label, fn):
        rows.append((label, *(fn(r) for r in results.values())))

    add("throughput, output tok/s", lambda r: f"{r['throughput']['output_tok_s']:.1f}")
    add("throughput, all tok/s", lambda r: f"{r['throughput']['total_tok_s']:.1f}")
    add("latency b=1: TTFT ms", lambda r: f"{r['latency']['ttft_ms']:.1f}")
    add("latency b=1: ms / output token", lambda r: f"{r['latency']['tpot_ms']:.2f}")
    add("start-up to first token, s", lambda r: f"{r['startup_s']:.2f}")
    add("CPU share taken by others", lambda r: ", ".join(f"{x['others_cpu_share']:.0%}" for x in r["runs"]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vllm-python", default="/work/vllm-venv/bin/python")
    ap.add_argument("--dtype", default="bfloat16",
                    help="bfloat16 (Param2's own dtype), float32, or both comma-separated (one run each)")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--latency-output-len", type=int, default=64)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--kv-gib", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--engines", default="param2moe,vllm")
    ap.add_argument("--wait-idle", type=float, default=120,
                    help="before each engine, wait up to this many seconds for idle CPUs (0: don't)")
    ap.add_argument("--quantization", help="param2moe's weights: int8 or int4 (vLLM runs unquantized)")
    ap.add_argument("--quantize-head", action="store_true", help="with --quantization: the output head too")
    ap.add_argument("--no-mmap-weights", action="store_true",
                    help="param2moe copies its weights into the process (default: left in the mapped files)")
    ap.add_argument("--ckpt", help="use this checkpoint (of the one --dtype) instead of writing one")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/cpu_bench_<date>.json)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--launch-time", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a)

    engines = a.engines.split(",")
    dtypes = a.dtype.split(",")
    if any(d not in ("bfloat16", "float32") for d in dtypes) or (a.ckpt and len(dtypes) > 1):
        raise SystemExit("--dtype: bfloat16, float32 or both (one dtype with --ckpt)")
    pythons = {"param2moe": sys.executable, "vllm": a.vllm_python}
    by_dtype, columns = {}, {}
    for dtype in dtypes:
        a.dtype = dtype
        tmp = None
        if a.ckpt:
            ckpt, n_params = a.ckpt, None
        else:
            tmp = tempfile.mkdtemp(prefix="p2m-cpu-bench-")
            ckpt = os.path.join(tmp, "model")
            n_params = write_model(ckpt, dtype, seed=0)
            print(f"checkpoint: {n_params / 1e6:.1f}M parameters, {dtype}, {ckpt}", file=sys.stderr)
        try:
            runs: dict[str, list[dict]] = {e: [] for e in engines}
            for rep in range(a.repeats):
                for e in engines:
                    print(f"[{dtype} {rep + 1}/{a.repeats}] {e} (load {loadavg()})", file=sys.stderr)
                    runs[e].append(run_worker(e, pythons[e], a, ckpt))
        finally:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
        results = {e: best(r) for e, r in runs.items()}
        entry = {"parameters": n_params, "results": results}
        if len(results) == 2:
            ours, vllm = results["param2moe"], results["vllm"]
            entry["throughput_ratio"] = ours["throughput"]["output_tok_s"] / vllm["throughput"]["output_tok_s"]
            entry["startup_ratio"] = ours["startup_s"] / vllm["startup_s"]
        by_dtype[dtype] = entry
        short = {"bfloat16": "bf16", "float32": "fp32"}[dtype]
        columns.update({f"{e} {short}": r for e, r in results.items()})
    text = table(columns)
    print(text)
    for dtype, entry in by_dtype.items():
        if "throughput_ratio" in entry:
            print(f"{dtype}: throughput ours / vLLM {entry['throughput_ratio']:.2f} (target >= 1); "
                  f"start-up ours / vLLM {entry['startup_ratio']:.3f} (target <= 0.2)")
    now = datetime.datetime.now(datetime.timezone.utc)
    version_code = "import {} as m; print(m.__version__)"
    doc = {
        "date": now.isoformat(timespec="seconds"),
        "git_commit": _sh(["git", "-C", ROOT, "rev-parse", "HEAD"]),
        "git_dirty": bool(_sh(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"])),
        "command": " ".join([os.path.relpath(sys.executable), *sys.argv]),
        "machine": machine(),
        "model": {"preset": "small", "overrides": MODEL, "routing": "the writer's router (real top-k routing)"},
        "settings": {k: getattr(a, k) for k in ("num_requests", "input_len", "output_len", "latency_output_len",
                                                 "max_num_seqs", "max_num_batched_tokens", "max_model_len",
                                                 "kv_gib", "repeats", "wait_idle")},
        "versions": {e: _sh([pythons[e], "-c", version_code.format("vllm" if e == "vllm" else "torch")])
                     for e in engines},
        "by_dtype": by_dtype,
        "table": text,
    }
    out = a.out or os.path.join(ROOT, "benchmarks", "results", f"cpu_bench_{now:%Y-%m-%d}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
