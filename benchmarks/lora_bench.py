#!/usr/bin/env python3
"""Multi-LoRA on the GPU, in one call: correctness, then the decode step with adapters, ours and vLLM's.

    python3 benchmarks/lora_bench.py [--sections correctness,ours,vllm] [--out DIR]

1. correctness: a small Param2-layout checkpoint (preset small, float32) with random adapters of every kind
   of target module (attention qkv, dense, the dense layer's MLP, shared experts, routed experts, and all of
   them), served together with CUDA graphs (4 slots for 6 adapters and the base model, so requests wait
   for slots), against the checkpoint with each adapter merged into its weights (lora.files.merge_adapter)
   run without LoRA: greedy tokens equal, prompt and output logprobs within 1e-4. PASS/FAIL.
2. ours: dummy Param2-17B weights (experts chosen uniformly at random, SPEC 7), bf16, 64 requests of 128
   prompt tokens decoding 64 tokens, 16 random adapters of rank 16 (--targets); the median decode step
   (wall, host included) and one replay of its CUDA graph (GPU time alone) for 0, 1, 4 and 16 distinct
   adapters in the batch, on an engine with --enable-lora (max_loras 16), against the engine without it.
3. vllm: the same with vLLM 0.26 (the kit of ../shared/vllm-gpu: its parts .peer/whl/p* unpacked to /tmp/site,
   the model folder /tmp/p2m17 from .peer/vllm_gpu_model.py; done here when missing, or by --prepare-vllm),
   same adapter folders, uniform routing, each engine in its own process; step time = (t(136 out) -
   t(8 out)) / 128, as the kit's bench measures it.
Prints a table and writes lora_bench.json to --out (default $OUT, else benchmarks/results/lora_bench), with
the sections earlier calls ran on the same machine (kept in /tmp/lora_bench/results.json), so that the
sections may run in separate calls on one warm machine and still be reported side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

T0 = time.perf_counter()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = "/tmp/lora_bench"
BATCH, PROMPT_LEN, OUT_LEN, RANK, COUNTS = 64, 128, 64, 16, (0, 1, 4, 16)
CORRECT_TOL = 1e-4


def log(*a):
    print(f"[lora_bench {time.perf_counter() - T0:7.1f}s]", *a, flush=True)


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 16) for _ in range(length)] for _ in range(n)]


# ---------------------------------------------------------------------------------------- correctness
def correctness(res: dict) -> None:
    from param2moe import LLM, LoRARequest, SamplingParams
    from param2moe.lora.files import KINDS, merge_adapter, random_adapter
    from param2moe.writer import preset_config, write_checkpoint

    cfg = preset_config("small", {"torch_dtype": "float32"})
    base = f"{WORK}/small"
    write_checkpoint(base, cfg, seed=1, head_std=0.3)
    kinds = {k: [k] for k in KINDS} | {"all": list(KINDS)}
    requests, merged = [None], [base]
    for i, (name, ks) in enumerate(kinds.items(), 1):
        folder = f"{WORK}/small-{name}"
        random_adapter(folder, cfg, ks, r=8 if name != "all" else 16, seed=i, use_rslora=name == "all")
        merge_adapter(base, folder, folder + "-merged")
        requests.append(LoRARequest(name, i, folder))
        merged.append(folder + "-merged")
    prompts = random_prompts(2 * len(requests), 40, cfg.vocab_size, seed=3)
    which = [i % len(requests) for i in range(len(prompts))]
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, prompt_logprobs=0, logprobs=0)
    small = dict(max_model_len=256, kv_cache_memory=1 << 28)
    with LLM(base, enable_lora=True, max_loras=4, max_lora_rank=16, lora_routed_experts=True, max_num_seqs=32,
             **small) as llm:
        got = llm.generate(prompts, sp, use_tqdm=False, lora_request=[requests[w] for w in which])
    rows = []
    for j, path in enumerate(merged):
        idx = [i for i, w in enumerate(which) if w == j]
        with LLM(path, enforce_eager=True, **small) as ref_llm:
            refs = ref_llm.generate([prompts[i] for i in idx], sp, use_tqdm=False)
        for i, ref in zip(idx, refs):
            rows.append(_compare(got[i], ref, requests[j].lora_name if requests[j] else "base"))
    worst = max(r["max_logprob_diff"] for r in rows)
    ok = all(r["tokens_equal"] for r in rows) and worst <= CORRECT_TOL
    res["correctness"] = {"pass": ok, "max_logprob_diff": worst, "tolerance": CORRECT_TOL, "rows": rows}
    log(f"correctness: {'PASS' if ok else 'FAIL'} (max logprob diff {worst:.2e}, "
        f"{sum(r['tokens_equal'] for r in rows)}/{len(rows)} greedy sequences equal)")


def _compare(got, ref, name: str) -> dict:
    diffs = [abs(g[t].logprob - r[t].logprob) for g, r, t in
             zip(got.prompt_logprobs[1:], ref.prompt_logprobs[1:], got.prompt_token_ids[1:])]
    diffs += [abs(g[t].logprob - r[t].logprob) for g, r, t in
              zip(got.outputs[0].logprobs, ref.outputs[0].logprobs, ref.outputs[0].token_ids)]
    return {"adapter": name, "tokens_equal": got.outputs[0].token_ids == ref.outputs[0].token_ids,
            "max_logprob_diff": max(diffs)}


# ---------------------------------------------------------------------------------------- adapters
def bench_adapters(preset: str, targets: list[str], n: int = max(COUNTS)) -> list[str]:
    """n random rank-16 adapters (bf16) of the preset's shapes, written once."""
    import torch

    from param2moe.lora.files import random_adapter
    from param2moe.writer import preset_config

    cfg = preset_config(preset)
    folders = []
    for i in range(n):
        folder = f"{WORK}/{preset}-{'-'.join(targets)}-{i}"
        if not os.path.exists(os.path.join(folder, "adapter_model.safetensors")):
            random_adapter(folder, cfg, targets, r=RANK, seed=100 + i, strength=0.1, dtype=torch.bfloat16)
        folders.append(folder)
    return folders


# ---------------------------------------------------------------------------------------- ours
def _decode_steps(engine, adapters: list | None, seed: int) -> list[float]:
    """64 requests (adapter i % len(adapters), or none), all prefilled in one step, greedy; each later step's
    wall time."""
    from param2moe.engine import OutputKind, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=OUT_LEN, ignore_eos=True, detokenize=False,
                            output_kind=OutputKind.DELTA)
    for i, p in enumerate(random_prompts(BATCH, PROMPT_LEN, engine.model_config.vocab_size, seed)):
        engine.add_request(f"b{seed}-{i}", p, params, lora_request=adapters[i % len(adapters)] if adapters else None)
    steps, started = [], False
    while engine.has_unfinished_requests():
        t = time.perf_counter()
        outs = engine.step()
        if started:
            steps.append(time.perf_counter() - t)
        started = started or any(o.outputs[0].token_ids for o in outs)
    return steps


def _measure(engine, adapters, seed: int) -> dict:
    _decode_steps(engine, adapters, seed)  # warm-up: kernels of these shapes compile here
    steps = _decode_steps(engine, adapters, seed + 1)
    row = {"step_ms": statistics.median(steps) * 1e3, "steps": len(steps)}
    graphs = engine.runner.graphs
    if graphs is not None:  # the last decode step's graph (its inputs: this batch's adapter mix)
        row["graph_gpu_ms"] = graphs.replay_seconds(BATCH) * 1e3
    return row


def ours(res: dict, preset: str, folders: list[str], targets: list[str]) -> None:
    from param2moe import LoRARequest
    from param2moe.engine import EngineConfig, LLMEngine

    base = dict(load_format="dummy", preset=preset, max_model_len=1024, max_num_seqs=BATCH,
                max_num_batched_tokens=BATCH * PROMPT_LEN, enable_prefix_caching=False)
    out = res["ours"] = {"targets": targets, "rank": RANK, "rows": {}}
    engine = LLMEngine(EngineConfig(**base))
    out["rows"]["no LoRA"] = _measure(engine, None, seed=1)
    log("ours, no LoRA:", out["rows"]["no LoRA"])
    engine.shutdown()
    del engine
    _release()
    t = time.perf_counter()
    engine = LLMEngine(EngineConfig(**base, enable_lora=True, max_loras=max(COUNTS), max_lora_rank=RANK))
    out["lora_engine_start_s"] = time.perf_counter() - t
    requests = [LoRARequest(f"a{i}", i + 1, f) for i, f in enumerate(folders)]
    for n in COUNTS:
        out["rows"][f"{n} adapters"] = _measure(engine, requests[:n] or None, seed=10 + n)
        log(f"ours, {n} adapters:", out["rows"][f"{n} adapters"])
    engine.shutdown()


# ---------------------------------------------------------------------------------------- vLLM
def vllm_worker(spec: dict) -> dict:
    """In the kit's interpreter: one vLLM engine (with or without LoRA), the step time for each count."""
    os.environ["VLLM_MOE_ROUTING_SIMULATION_STRATEGY"] = "uniform_random"
    import torch
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    kw = dict(model=spec["model"], load_format="dummy", trust_remote_code=True, skip_tokenizer_init=True,
              dtype="bfloat16", max_model_len=1024, gpu_memory_utilization=0.85, max_num_seqs=BATCH, seed=0,
              enable_prefix_caching=False)
    if spec["lora"]:
        kw.update(enable_lora=True, max_loras=max(COUNTS), max_lora_rank=RANK, max_cpu_loras=max(COUNTS))
    llm = LLM(**kw)
    vocab = json.load(open(os.path.join(spec["model"], "config.json")))["vocab_size"]
    requests = [LoRARequest(f"a{i}", i + 1, f) for i, f in enumerate(spec["folders"])]

    def run(n, max_tokens, seed):
        prompts = [{"prompt_token_ids": p} for p in random_prompts(BATCH, PROMPT_LEN, vocab, seed)]
        sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True,
                            detokenize=False)
        lora = [requests[i % n] for i in range(BATCH)] if n else None
        torch.cuda.synchronize()
        t = time.perf_counter()
        llm.generate(prompts, sp, use_tqdm=False, lora_request=lora)
        return time.perf_counter() - t

    rows = {}
    for n in spec["counts"]:
        run(n, 8, seed=n)  # warm-up
        short = statistics.median(run(n, 8, seed=100 * n + r) for r in range(2))
        long = statistics.median(run(n, 136, seed=100 * n + 50 + r) for r in range(2))
        rows[f"{n} adapters" if spec["lora"] else "no LoRA"] = {"step_ms": (long - short) / 128 * 1e3}
    import vllm

    return {"vllm": vllm.__version__, "rows": rows}


def prepare_vllm_kit() -> str | None:
    """Unpack the vLLM kit's parts (.peer/whl/p*, carried to the device as its README says) into /tmp/site and
    write the model folder /tmp/p2m17, unless there already; None when done, else what is missing."""
    import glob

    if not os.path.exists("/tmp/site/.kit_complete"):
        parts = sorted(glob.glob(os.path.join(ROOT, ".peer/whl/p*/vllm_site.tar.xz.part*")))
        if not parts:
            return "no vLLM kit: /tmp/site is not unpacked and .peer/whl/p*/ holds no parts"
        log(f"unpacking the vLLM kit ({len(parts)} parts)")
        with open("/tmp/vllm_site.tar.xz", "wb") as out:
            for part in parts:
                out.write(open(part, "rb").read())
        os.makedirs("/tmp/site", exist_ok=True)
        if subprocess.run(["tar", "-xJf", "/tmp/vllm_site.tar.xz", "-C", "/tmp/site"]).returncode:
            return "unpacking the vLLM kit failed (parts incomplete?)"
        os.remove("/tmp/vllm_site.tar.xz")
        open("/tmp/site/.kit_complete", "w").close()
    if not os.path.isdir("/tmp/p2m17"):
        writer = os.path.join(ROOT, ".peer/vllm_gpu_model.py")
        if subprocess.run([sys.executable, writer, "/tmp/p2m17"]).returncode:
            return f"writing /tmp/p2m17 with {writer} failed"
    return None


def vllm(res: dict, folders: list[str], timeout: int) -> None:
    out = res["vllm"] = {"rows": {}}
    env = dict(os.environ, PYTHONPATH="/tmp/site", VLLM_ENABLE_V1_MULTIPROCESSING="0", HF_HUB_OFFLINE="1",
               VLLM_NO_USAGE_STATS="1", VLLM_USE_FLASHINFER_SAMPLER="0", PYTHONUNBUFFERED="1")
    missing = prepare_vllm_kit()
    if missing:
        out["error"] = missing
        log(missing)
        return
    for lora, counts in ((False, [0]), (True, list(COUNTS))):
        spec = {"model": "/tmp/p2m17", "lora": lora, "counts": counts, "folders": folders}
        try:
            p = subprocess.run([sys.executable, __file__, "--vllm-worker", json.dumps(spec)], env=env,
                               capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            out.setdefault("errors", []).append(f"lora={lora}: timed out after {timeout} s")
            continue
        lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT_JSON ")]
        if p.returncode or not lines:
            out.setdefault("errors", []).append(f"lora={lora}: rc {p.returncode}: {p.stderr[-3000:]}")
            log("vLLM failed:", p.stderr[-3000:])
            continue
        got = json.loads(lines[-1][len("RESULT_JSON "):])
        out["version"] = got["vllm"]
        out["rows"].update(got["rows"])
        log("vLLM:", got["rows"])


def _release() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------- report
def report(res: dict) -> None:
    ours_rows, v_rows = res.get("ours", {}).get("rows", {}), res.get("vllm", {}).get("rows", {})
    base, vbase = ours_rows.get("no LoRA", {}).get("step_ms"), v_rows.get("no LoRA", {}).get("step_ms")
    print(f"\ndecode step at batch {BATCH}, rank {RANK} ({res.get('gpu', '?')})")
    print(f"{'':<12} {'ours ms':>8} {'GPU ms':>7} {'overhead':>8} {'vLLM ms':>8} {'vLLM ovh':>8} "
          f"{'ours/vLLM tput':>14}")
    for key in ["no LoRA"] + [f"{n} adapters" for n in COUNTS]:
        o, v = ours_rows.get(key, {}), v_rows.get(key, {})
        cells = [f"{o['step_ms']:.2f}" if o else "-", f"{o['graph_gpu_ms']:.2f}" if "graph_gpu_ms" in o else "-",
                 f"{o['step_ms'] / base - 1:+.1%}" if o and base else "-",
                 f"{v['step_ms']:.2f}" if v else "-", f"{v['step_ms'] / vbase - 1:+.1%}" if v and vbase else "-",
                 f"{v['step_ms'] / o['step_ms']:.2f}x" if o and v else "-"]
        print(f"{key:<12} {cells[0]:>8} {cells[1]:>7} {cells[2]:>8} {cells[3]:>8} {cells[4]:>8} {cells[5]:>14}")
    if "correctness" in res:
        c = res["correctness"]
        print(f"correctness: {'PASS' if c['pass'] else 'FAIL'}, max logprob diff {c['max_logprob_diff']:.2e}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default="correctness,ours,vllm")
    ap.add_argument("--targets", default="qkv,dense,dense_mlp,shared_experts",
                    help="module kinds the bench adapters adapt (lora.files.KINDS)")
    ap.add_argument("--preset", default="param2-17b", help="model shapes of the timed sections (vLLM: param2-17b)")
    ap.add_argument("--vllm-timeout", type=int, default=240, help="seconds for each vLLM engine's process")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "benchmarks/results/lora_bench"))
    ap.add_argument("--prepare-vllm", action="store_true", help="unpack the vLLM kit now (for a later --sections vllm)")
    ap.add_argument("--vllm-worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.vllm_worker:
        print("RESULT_JSON " + json.dumps(vllm_worker(json.loads(a.vllm_worker))), flush=True)
        return 0
    sys.path.insert(0, ROOT)
    import torch

    from param2moe.bench import machine_facts

    os.makedirs(a.out, exist_ok=True)
    os.makedirs(WORK, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # (cpu: a dry run of the correctness section)
    res = {"date": time.strftime("%F"), "gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu",
           "machine": machine_facts(device),
           "batch": BATCH, "prompt_len": PROMPT_LEN, "output_len": OUT_LEN, "rank": RANK}
    # Sections run by earlier calls on this (warm) machine: kept, so that a call of one section still
    # reports the others beside it (each section records its own time).
    earlier = os.path.join(WORK, "results.json")
    if os.path.exists(earlier):
        res = {**json.load(open(earlier)), **res}
    sections, targets = a.sections.split(","), a.targets.split(",")
    if a.prepare_vllm:
        log("vLLM kit:", prepare_vllm_kit() or "ready")
    steps = [("correctness", lambda: correctness(res))]
    if "ours" in sections or "vllm" in sections:
        folders = bench_adapters(a.preset, targets)
        steps += [("ours", lambda: ours(res, a.preset, folders, targets)),
                  ("vllm", lambda: vllm(res, folders, a.vllm_timeout))]
    for name, step in steps:
        if name in sections:
            try:
                step()
            except Exception as e:  # one section failing must not lose the others' numbers
                import traceback

                res[f"{name}_error"] = traceback.format_exc()
                log(f"{name} failed: {e!r}")
            _release()  # the next section (vLLM's processes) needs the GPU memory this process cached
            if isinstance(res.get(name), dict):
                res[name]["measured_at"] = time.strftime("%F %T")
            for path in (os.path.join(a.out, "lora_bench.json"), earlier):
                with open(path, "w") as f:
                    json.dump(res, f, indent=1)
    report(res)
    return 0 if res.get("correctness", {}).get("pass", True) else 1


if __name__ == "__main__":
    sys.exit(main())
