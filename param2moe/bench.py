"""`param2moe bench latency|throughput`: decode latency by batch size, offline throughput, and time to
first token, with the share of the weight-read floor (docs/model.md §7).

The floor of a decode step is the bytes it must read (attention and dense weights, the experts the
batch touches, the embedding rows, the head, and the KV cache) over the copy bandwidth measured in
the same run. With dummy weights the router picks experts uniformly at random (on by default, docs/model.md §7),
so a batch of B tokens touches E * (1 - (1 - K/E)^B) distinct experts per layer on average.
"""

from __future__ import annotations

import json
import math
import platform
import subprocess
import time

import torch

from .engine import EngineConfig, LLMEngine, OutputKind, SamplingParams
from .quant.plan import quantizable


def copy_bandwidth(device) -> float:
    """Device memory bandwidth in bytes/s: a large copy, read + write counted."""
    if not str(device).startswith("cuda"):
        a = torch.empty(64 << 20, dtype=torch.uint8)
        b = torch.empty_like(a)
        b.copy_(a)
        t = time.perf_counter()
        for _ in range(5):
            b.copy_(a)
        return 2 * a.numel() * 5 / (time.perf_counter() - t)
    a = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    return 2 * a.numel() * 10 / (start.elapsed_time(end) / 1e3)


def decode_step_bytes(engine: LLMEngine, batch: int, context: int) -> float:
    """Bytes one decode step of `batch` sequences with `context` cached tokens must read, whole model
    (all ranks together): the weights outside the routed experts, the routed experts the batch
    touches, the embedding rows, the head, and the KV cache. Quantized weights count their codes and
    scales (the model's QuantPlan)."""
    from .checkpoint import checkpoint_layout

    cfg = engine.model_config
    elem = torch.empty((), dtype=engine.dtype).element_size()
    plan = getattr(engine.model, "quant", None)

    def weight_bytes(name: str, shape) -> float:
        module = name.removesuffix(".weight")
        if plan is not None and module != name and quantizable(module, plan.head):
            return plan.empty(shape, device="meta").nbytes()
        return math.prod(shape) * (4 if name.endswith(("mlp.gate.weight", "expert_bias")) else elem)  # fp32 router

    total = 0.0
    for name, shape in checkpoint_layout(cfg).items():
        if ".mlp.experts." in name:
            continue  # routed experts: counted below, by the ones touched
        size = weight_bytes(name, shape)
        if name.endswith("word_embeddings.weight"):  # the batch's rows; all of it when it is the head too
            head = weight_bytes("lm_head.weight", shape) if plan is not None else size
            size = batch * cfg.hidden_size * elem + (head if cfg.tie_word_embeddings else 0)
        total += size
    if cfg.is_moe:
        e, k = cfg.num_experts, cfg.num_experts_per_tok
        touched = e * (1 - (1 - k / e) ** batch)
        h, w = cfg.hidden_size, cfg.moe_intermediate_size
        per_expert = sum(weight_bytes(f"x.{p}.weight", s) for p, s in (("gate_proj", (w, h)), ("up_proj", (w, h)),
                                                                          ("down_proj", (h, w))))
        n_moe = sum(1 for i in range(cfg.num_hidden_layers) if not cfg.is_dense_layer(i))
        total += n_moe * touched * per_expert
    kv = 2 * cfg.num_kv_heads * cfg.head_size * elem * cfg.num_hidden_layers
    return total + batch * context * kv


def _engine(args, **overrides) -> LLMEngine:
    cfg = EngineConfig.from_cli_args(args)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    if args.routing is not None:
        cfg.uniform_random_routing = args.routing == "uniform_random"
    return LLMEngine(cfg)


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab, (n, length), generator=g).tolist()


TTFT_REPEATS = 5  # the first token is one prefill: a single sample is noisy (vLLM's bench: median of 5)


def _run_batch(engine: LLMEngine, batch: int, input_len: int, output_len: int, seed: int):
    """One batch of fresh random prompts, greedy: (seconds to the first token, each later step's seconds)."""
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True, detokenize=False,
                            output_kind=OutputKind.DELTA)
    for i, p in enumerate(_random_prompts(batch, input_len, vocab, seed=seed)):
        engine.add_request(f"lat-{batch}-{seed}-{i}", p, params)
    _sync(engine.config.device)
    t0 = time.perf_counter()
    steps = []
    first_token = None
    while engine.has_unfinished_requests():
        t = time.perf_counter()
        outs = engine.step()
        now = time.perf_counter()
        if first_token is None and any(o.outputs[0].token_ids for o in outs):
            first_token = now - t0
        elif first_token is not None:
            steps.append(now - t)
    return first_token, steps


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else float("nan")


def bench_latency(engine: LLMEngine, batch: int, input_len: int, output_len: int) -> dict:
    """TTFT of the batch's prefill (median of TTFT_REPEATS batches of fresh prompts), then the median
    decode step (ITL) over output_len steps. A first pass of the same shapes (other prompts: no
    prefix-cache hits) compiles the kernels for them, so no compilation is timed."""
    _run_batch(engine, batch, input_len, min(output_len, 4), seed=batch)
    ttfts = [_run_batch(engine, batch, input_len, 1, seed=batch + 1000 + r)[0] for r in range(1, TTFT_REPEATS)]
    first_token, steps = _run_batch(engine, batch, input_len, output_len, seed=batch + 1000)
    ttfts = sorted([first_token, *ttfts])
    itl = _median(steps)
    row = {"batch": batch, "ttft_s": _median(ttfts), "ttft_all_s": ttfts, "itl_s": itl, "tok_per_s": batch / itl,
           "floor_bytes": decode_step_bytes(engine, batch, input_len + output_len // 2)}
    graphs = engine.runner.graphs
    if graphs is not None and batch <= graphs.sizes[-1] and engine.comm is None:  # (other ranks would not replay)
        row["graph_gpu_s"] = graphs.replay_seconds(batch)  # the decode step's GPU time alone
    return row


def bench_throughput(engine: LLMEngine, num_prompts: int, input_len: int, output_len: int, seed: int = 7) -> dict:
    vocab = engine.model_config.vocab_size
    # Only the finished outputs, as LLM.generate asks for them (no per-step output objects).
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True, detokenize=False,
                            output_kind=OutputKind.FINAL_ONLY)
    for i, p in enumerate(_random_prompts(num_prompts, input_len, vocab, seed=seed)):
        engine.add_request(f"tp-{seed}-{i}", p, params)
    _sync(engine.config.device)
    t0 = time.perf_counter()
    tokens = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                tokens += len(out.outputs[0].token_ids)
    elapsed = time.perf_counter() - t0
    return {"num_prompts": num_prompts, "input_len": input_len, "output_len": output_len, "seconds": elapsed,
            "output_tok_per_s": tokens / elapsed, "total_tok_per_s": (tokens + num_prompts * input_len) / elapsed}


def machine_facts(device) -> dict:
    facts = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}
    if str(device).startswith("cuda"):
        facts["gpu"] = torch.cuda.get_device_name()
    else:
        facts["cpu"] = platform.processor() or platform.machine()
        facts["cores"] = torch.get_num_threads()
    try:
        git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, timeout=5).stdout.strip()  # noqa: E731
        facts["commit"] = git("rev-parse", "--short", "HEAD")
        # files that differ from that commit (a copied tree may carry stale git metadata): then the commit
        # alone does not name the code that ran
        facts["commit_dirty"] = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        pass
    return facts


def run_bench(args) -> int:
    t0 = time.perf_counter()
    engine = _engine(args)
    start_s = time.perf_counter() - t0
    dev = engine.config.device
    bandwidth = copy_bandwidth(dev)
    result = {"mode": args.mode, "model": args.model or engine.config.model_name, "dtype": str(engine.dtype),
              "quantization": getattr(engine.model.quant, "option", None),
              "uniform_random_routing": bool(engine.config.uniform_random_routing), "engine_start_s": start_s,
              "copy_bandwidth_GBps": bandwidth / 1e9, "machine": machine_facts(dev), "date": time.strftime("%F"),
              "rows": []}
    if args.mode == "latency":
        print(f"{'batch':>6} {'TTFT ms':>9} {'ITL ms':>8} {'GPU ms':>7} {'tok/s':>9} {'floor ms':>9} {'of floor':>8}")
        for b in args.batch_size:
            row = bench_latency(engine, b, args.input_len, args.output_len)
            # tensor-parallel ranks read their slices at the same time; pipeline stages one after another
            row["floor_s"] = row["floor_bytes"] / (bandwidth * engine.config.tensor_parallel_size)
            row["share_of_floor"] = row["floor_s"] / row["itl_s"]
            result["rows"].append(row)
            gpu = f"{row['graph_gpu_s'] * 1e3:>7.2f}" if "graph_gpu_s" in row else f"{'-':>7}"
            print(f"{b:>6} {row['ttft_s'] * 1e3:>9.1f} {row['itl_s'] * 1e3:>8.2f} {gpu} {row['tok_per_s']:>9.1f} "
                  f"{row['floor_s'] * 1e3:>9.2f} {row['share_of_floor']:>8.0%}")
    else:
        # warm up on the measured shapes (other prompts), so that no kernel compiles while timed
        bench_throughput(engine, args.num_prompts, args.input_len, 4, seed=8)
        row = bench_throughput(engine, args.num_prompts, args.input_len, args.output_len)
        result["rows"].append(row)
        print(f"{row['num_prompts']} requests x ({args.input_len} in, {args.output_len} out): "
              f"{row['output_tok_per_s']:.1f} output tok/s, {row['seconds']:.2f} s")
    if engine.config.uniform_random_routing:
        print("(experts chosen uniformly at random: dummy-weight routing, docs/model.md §7)")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
