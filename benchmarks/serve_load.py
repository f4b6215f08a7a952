#!/usr/bin/env python
"""Load benchmark of `param2moe serve`, shaped like vLLM's benchmark_serving.

    python benchmarks/serve_load.py --launch [--server-args "--dtype float32"]     # start a server here
    python benchmarks/serve_load.py --base-url http://127.0.0.1:8000 [--api-key KEY]  # or use a running one

    --num-prompts 64 --max-concurrency 16 --request-rate inf|R (Poisson arrivals at R requests/s)
    --input-len 128 --output-len 64 --range-ratio 0.0 (lengths uniform in len*(1 +- ratio))
    --endpoint completions|chat --seed 0 --tag NAME --result-dir benchmarks/results

Prompts are random token ids drawn from the tokenizer's vocabulary (completions: sent as ids, so the
input length is exact; chat: decoded to text first), and every request asks for its output length with
ignore_eos, so the work is fixed. Each request streams (SSE) with usage included; per request it
measures the time to first token (TTFT), the gaps between token chunks (ITL) and the end-to-end time.
Prints a table and writes JSON (results, settings, machine, date, git commit, command line) to
--result-dir.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Result:
    ok: bool = False
    error: str = ""
    input_len: int = 0
    output_len: int = 0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


async def one_request(client: httpx.AsyncClient, args, model: str, prompt, input_len: int, output_len: int
                      ) -> Result:
    res = Result(input_len=input_len)
    body = {"model": model, "max_tokens": output_len, "ignore_eos": True, "temperature": args.temperature,
            "stream": True, "stream_options": {"include_usage": True}}
    if args.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
        path = "/v1/chat/completions"
    else:
        body["prompt"] = prompt
        path = "/v1/completions"
    start = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    res.error = chunk["error"]["message"]
                    return res
                if chunk.get("usage"):
                    res.output_len = chunk["usage"]["completion_tokens"]
                    res.input_len = chunk["usage"]["prompt_tokens"]
                if not chunk.get("choices"):
                    continue
                c = chunk["choices"][0]
                if args.endpoint == "chat":  # a chat chunk with no text (a token that decodes to nothing) is not sent
                    delta = c.get("delta") or {}
                    if not (delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls")):
                        continue
                # completions: every chunk carries one new token (its text may be empty)
                now = time.perf_counter()
                if last is None:
                    res.ttft = now - start
                else:
                    res.itl.append(now - last)
                last = now
        res.latency = time.perf_counter() - start
        res.ok = res.output_len > 0
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


async def run_load(args, model: str, prompts: list, in_lens: list[int], out_lens: list[int]) -> tuple[list, float]:
    limits = httpx.Limits(max_connections=args.max_concurrency or 1000, max_keepalive_connections=None)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    rng = random.Random(args.seed + 1)
    sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    async with httpx.AsyncClient(base_url=args.base_url, timeout=httpx.Timeout(3600), limits=limits,
                                 headers=headers) as client:
        async def limited(i: int) -> Result:
            if sem is None:
                return await one_request(client, args, model, prompts[i], in_lens[i], out_lens[i])
            async with sem:
                return await one_request(client, args, model, prompts[i], in_lens[i], out_lens[i])

        start = time.perf_counter()
        tasks = []
        for i in range(len(prompts)):
            tasks.append(asyncio.create_task(limited(i)))
            if args.request_rate != float("inf") and i < len(prompts) - 1:
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


def summarize(results: list[Result], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft for r in ok]
    itl = [x for r in ok for x in r.itl]
    tpot = [(r.latency - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1]
    e2e = [r.latency for r in ok]
    out_tokens = sum(r.output_len for r in ok)
    in_tokens = sum(r.input_len for r in ok)
    s = {"completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
         "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
         "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
         "total_token_throughput": (in_tokens + out_tokens) / duration}
    for name, xs in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2el", e2e)):
        s[f"mean_{name}_ms"] = mean(xs) * 1e3
        s[f"p50_{name}_ms"] = percentile(xs, 50) * 1e3
        s[f"p99_{name}_ms"] = percentile(xs, 99) * 1e3
    errors = [r.error for r in results if not r.ok]
    if errors:
        s["first_errors"] = errors[:5]
    return s


def print_table(s: dict, args, model: str) -> None:
    rate = "inf" if args.request_rate == float("inf") else f"{args.request_rate:g}/s (Poisson)"
    rows = [
        ("Model", model), ("Endpoint", args.endpoint), ("Request rate", rate),
        ("Max concurrency", args.max_concurrency or "none"), ("Successful requests", s["completed"]),
        ("Failed requests", s["failed"]), ("Duration (s)", f"{s['duration_s']:.2f}"),
        ("Input tokens", s["total_input_tokens"]), ("Output tokens", s["total_output_tokens"]),
        ("Requests/s", f"{s['request_throughput']:.2f}"), ("Output tokens/s", f"{s['output_throughput']:.1f}"),
        ("Total tokens/s", f"{s['total_token_throughput']:.1f}"),
        ("TTFT mean / p50 / p99 (ms)", f"{s['mean_ttft_ms']:.1f} / {s['p50_ttft_ms']:.1f} / {s['p99_ttft_ms']:.1f}"),
        ("TPOT mean / p50 / p99 (ms)", f"{s['mean_tpot_ms']:.1f} / {s['p50_tpot_ms']:.1f} / {s['p99_tpot_ms']:.1f}"),
        ("ITL mean / p50 / p99 (ms)", f"{s['mean_itl_ms']:.1f} / {s['p50_itl_ms']:.1f} / {s['p99_itl_ms']:.1f}"),
        ("E2E mean / p50 / p99 (ms)", f"{s['mean_e2el_ms']:.1f} / {s['p50_e2el_ms']:.1f} / {s['p99_e2el_ms']:.1f}"),
    ]
    width = max(len(k) for k, _ in rows)
    print("=" * (width + 24))
    print(" Serving benchmark result ".center(width + 24, "="))
    for k, v in rows:
        print(f"{k:<{width}}  {v:>20}")
    print("=" * (width + 24))


def machine_facts() -> dict:
    facts = {"platform": platform.platform(), "python": platform.python_version(), "cores": os.cpu_count()}
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout.splitlines():
            if line.startswith("Model name:"):
                facts["cpu"] = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        if out:
            facts["gpu"] = out.splitlines()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        facts["load_avg"] = os.getloadavg()
    except OSError:
        pass
    return facts


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def launch_server(args) -> subprocess.Popen:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "param2moe.cli", "serve", "--port", str(port), *shlex.split(args.server_args)]
    if args.api_key:
        cmd += ["--api-key", args.api_key]
    log = open(args.server_log, "w") if args.server_log else subprocess.DEVNULL
    path = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=path))
    args.base_url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode} (see --server-log)")
        try:
            if httpx.get(args.base_url + "/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit("the server did not come up in 600 s")


def make_prompts(args, model: str) -> tuple[list, list[int], list[int]]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with httpx.Client(base_url=args.base_url, headers=headers, timeout=60) as h:
        # a pool of ordinary tokens: those of a sample text (ids of the tokenizer, no special tokens)
        sample = ("The engine keeps keys and values in a paged cache, schedules requests in batches, and streams "
                  "tokens. India is a land of many languages: Hindi, Bengali, Telugu, Marathi, Tamil, Urdu. "
                  "Mixture of experts models send each token to a few experts chosen by a router. ") * 4
        pool = sorted(set(h.post("/tokenize", json={"model": model, "prompt": sample,
                                                    "add_special_tokens": False}).json()["tokens"]))
        rng = random.Random(args.seed)

        def length(n: int) -> int:
            lo, hi = int(n * (1 - args.range_ratio)), int(n * (1 + args.range_ratio))
            return max(1, rng.randint(lo, hi))

        in_lens = [length(args.input_len) for _ in range(args.num_prompts)]
        out_lens = [length(args.output_len) for _ in range(args.num_prompts)]
        prompts = []
        for n in in_lens:
            ids = [rng.choice(pool) for _ in range(n)]
            if args.endpoint == "chat":
                prompts.append(h.post("/detokenize", json={"model": model, "tokens": ids}).json()["prompt"])
            else:
                prompts.append(ids)
    return prompts, in_lens, out_lens


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--launch", action="store_true", help="start `param2moe serve` here (on a free port)")
    p.add_argument("--server-args", default="", help="with --launch: arguments for `param2moe serve`")
    p.add_argument("--server-log", default=None, help="with --launch: write the server's log here")
    p.add_argument("--api-key", default=None)
    p.add_argument("--model", default=None, help="default: the one the server lists")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--max-concurrency", type=int, default=16, help="0: no limit")
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (Poisson); inf: all at once")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--range-ratio", type=float, default=0.0, help="0: fixed lengths; r: uniform in len*(1+-r)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=2, help="requests sent (and not counted) before the run")
    p.add_argument("--tag", default=None, help="a name for the result file")
    p.add_argument("--result-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)

    proc = launch_server(args) if args.launch else None
    try:
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        model = args.model or httpx.get(args.base_url + "/v1/models", headers=headers,
                                        timeout=30).json()["data"][0]["id"]
        prompts, in_lens, out_lens = make_prompts(args, model)
        if args.warmup:
            asyncio.run(run_load(argparse.Namespace(**{**vars(args), "request_rate": float("inf")}), model,
                                 prompts[: args.warmup], in_lens[: args.warmup], [4] * args.warmup))
        load_before = os.getloadavg()
        results, duration = asyncio.run(run_load(args, model, prompts, in_lens, out_lens))
        summary = summarize(results, duration)
        print_table(summary, args, model)
        for e in summary.get("first_errors", []):
            print("failed:", e)
        server_version = httpx.get(args.base_url + "/version", timeout=10).json().get("version")
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    if not args.no_save:
        os.makedirs(args.result_dir, exist_ok=True)
        date = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        name = f"serve_load_{date}" + (f"_{args.tag}" if args.tag else "") + ".json"
        settings = {k: v for k, v in vars(args).items() if k not in ("api_key",)}
        settings["request_rate"] = str(args.request_rate)
        record = {"benchmark": "serve_load", "model": model, "server_version": server_version,
                  "settings": settings, "results": summary,
                  "machine": {**machine_facts(), "load_avg_before_run": load_before},
                  "date": datetime.datetime.now().isoformat(timespec="seconds"), "git_commit": git_commit(),
                  "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])}
        path = os.path.join(args.result_dir, name)
        with open(path, "w") as f:
            json.dump(record, f, indent=2)
        print(f"wrote {os.path.relpath(path, ROOT)}")
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
