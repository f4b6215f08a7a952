#!/usr/bin/env python
"""Expert load balancing (EPLB) on one GPU: correctness, then the decode step's cost with it off and on.

    python benchmarks/eplb_bench.py [--batch 1 64] [--redundant 0 8] [--rounds 2]

1. Correctness (a small float32 checkpoint whose routers favour a few experts, written here): greedy tokens
   and logprobs of one GPU with CUDA graphs and EPLB on (2 redundant experts, a rearrangement every 4 steps,
   so several happen in the middle of generation, with the graphs captured before) against EPLB off, and
   against EPLB on without graphs. Tokens must be identical, logprobs within 1e-4.
2. Cost (dummy Param2-17B weights, bf16, experts chosen uniformly at random, SPEC 7): one engine a value of
   --redundant, built with EPLB; after 64 steps of load, one rearrangement (timed: every eplb_step_interval
   steps in serving). Then, `rounds` times interleaved, the decode graphs captured again with EPLB off (the
   layers route to slots by logical id, as without EPLB: the same work) and on (the map-and-count kernel
   after each router, the window updated after each step), and `bench latency`'s measurement at each batch
   size: the median engine step over 128 steps after 128-token prompts, and one graph replay alone (GPU).
   With redundant experts on one GPU a replicated expert's tokens are split over two copies whose weights
   are both read: that costs bandwidth by design (replicas pay off across GPUs); --redundant 0 is the
   mapping's own cost (target: within 2% at batch 64).
Prints a table; writes JSON to $OUT/eplb_bench.json (default benchmarks/results/eplb).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time

import torch
from safetensors.torch import load_file, save_file

from param2moe import LLM, SamplingParams
from param2moe.bench import bench_latency, machine_facts
from param2moe.engine import EngineConfig, LLMEngine
from param2moe.writer import preset_config, write_checkpoint


def correctness() -> dict:
    with tempfile.TemporaryDirectory() as path:
        write_checkpoint(path, preset_config("tiny", {"num_hidden_layers": 4, "num_experts": 16,
                                                      "num_experts_per_tok": 4}), seed=1)
        tensors = load_file(f"{path}/model.safetensors")
        for name, t in tensors.items():
            if name.endswith("expert_bias"):
                t[2:5] += 0.5
        save_file(tensors, f"{path}/model.safetensors", metadata={"format": "pt"})
        prompts = [list(range(20 + i, 20 + i + n)) for i, n in enumerate((3, 9, 17, 33, 60, 5, 12, 48))]
        params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=1, prompt_logprobs=0)
        runs = {}
        for name, kw in (("off", {}), ("on", dict(enable_eplb=True, num_redundant_experts=2, eplb_step_interval=4)),
                         ("on_eager", dict(enable_eplb=True, num_redundant_experts=2, eplb_step_interval=4,
                                           enforce_eager=True))):
            with LLM(path, dtype="float32", kv_cache_memory=1 << 28, max_model_len=256, **kw) as llm:
                runs[name] = llm.generate(prompts, params, use_tqdm=False)
                if name == "on":
                    rearrangements = llm.expert_load().rearrangements
    result = {"rearrangements": rearrangements}
    for other in ("on", "on_eager"):
        same = sum(a.outputs[0].token_ids == b.outputs[0].token_ids for a, b in zip(runs["off"], runs[other]))
        diff = max(abs(x[t] - y[t]) for a, b in zip(runs["off"], runs[other])
                   for x, y, t in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, a.outputs[0].token_ids))
        result[other] = {"same_tokens": same, "prompts": len(prompts), "max_logprob_diff": diff}
    result["pass"] = all(result[o]["same_tokens"] == len(prompts) and result[o]["max_logprob_diff"] <= 1e-4
                         for o in ("on", "on_eager")) and rearrangements >= 3
    return result


def set_eplb(engine: LLMEngine, balancer, on: bool) -> None:
    """Route the model through the balancer's maps (on), or by logical id as without EPLB (off), and recapture
    the decode graphs."""
    model, runner = engine.model, engine.runner
    if on:
        model.set_eplb_state(balancer.maps)
    else:
        model.expert_maps = None
        for moe in model.moe_layers:
            moe.expert_map = None
    runner.eplb = balancer if on else None
    runner.graphs = None
    torch.cuda.synchronize()
    runner.enable_cuda_graphs(engine.config.max_num_seqs, engine.max_model_len, 0, engine.sampler.greedy)


def cost(redundant: int, batches: list[int], rounds: int) -> list[dict]:
    engine = LLMEngine(EngineConfig(preset="param2-17b", load_format="dummy", max_model_len=2048, max_graph_tokens=0,
                                    max_num_seqs=max(batches), enable_eplb=True, num_redundant_experts=redundant,
                                    eplb_step_interval=1 << 30))
    balancer = engine.eplb
    bench_latency(engine, max(batches), 128, 64)  # load in the window
    torch.cuda.synchronize()
    t = time.perf_counter()
    balancer.rearrange()
    torch.cuda.synchronize()
    rearrange_s = time.perf_counter() - t
    print(f"redundant {redundant}: one rearrangement {rearrange_s * 1e3:.0f} ms "
          f"(imbalance now {balancer.expert_load().imbalance.mean():.3f})", flush=True)
    rows = []
    for r in range(rounds):
        for on in (False, True):
            set_eplb(engine, balancer, on)
            for b in batches:
                row = bench_latency(engine, b, 128, 128)
                row.update(redundant=redundant, eplb=on, round=r, rearrange_s=rearrange_s)
                rows.append(row)
                print(f"redundant {redundant} eplb {'on ' if on else 'off'} round {r} batch {b:>3}: step "
                      f"{row['itl_s'] * 1e3:.3f} ms, graph {row['graph_gpu_s'] * 1e3:.3f} ms", flush=True)
    engine.shutdown()
    del engine, balancer
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def summary(rows: list[dict]) -> list[dict]:
    out = []
    for r in sorted({row["redundant"] for row in rows}):
        for b in sorted({row["batch"] for row in rows}):
            med = {(on, k): statistics.median(x[k] for x in rows if x["redundant"] == r and x["batch"] == b
                                              and x["eplb"] == on) for on in (False, True)
                   for k in ("itl_s", "graph_gpu_s")}
            out.append({"redundant": r, "batch": b, "off_step_ms": med[False, "itl_s"] * 1e3,
                        "on_step_ms": med[True, "itl_s"] * 1e3, "step_ratio": med[True, "itl_s"] / med[False, "itl_s"],
                        "off_graph_ms": med[False, "graph_gpu_s"] * 1e3, "on_graph_ms": med[True, "graph_gpu_s"] * 1e3,
                        "graph_ratio": med[True, "graph_gpu_s"] / med[False, "graph_gpu_s"]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--redundant", type=int, nargs="+", default=[0, 8])
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    out_dir = os.environ.get("OUT", "benchmarks/results/eplb")
    os.makedirs(out_dir, exist_ok=True)
    check = correctness()
    print(f"correctness: {'PASS' if check['pass'] else 'FAIL'} {json.dumps(check)}", flush=True)
    rows = [row for r in args.redundant for row in cost(r, args.batch, args.rounds)]
    table = summary(rows)
    print(f"\n{'redundant':>9} {'batch':>5} {'step off ms':>11} {'step on ms':>10} {'ratio':>6} "
          f"{'graph off ms':>12} {'graph on ms':>11} {'ratio':>6}")
    for t in table:
        print(f"{t['redundant']:>9} {t['batch']:>5} {t['off_step_ms']:>11.3f} {t['on_step_ms']:>10.3f} "
              f"{t['step_ratio']:>6.3f} {t['off_graph_ms']:>12.3f} {t['on_graph_ms']:>11.3f} {t['graph_ratio']:>6.3f}")
    with open(os.path.join(out_dir, "eplb_bench.json"), "w") as f:
        json.dump({"machine": machine_facts("cuda"), "date": time.strftime("%F"), "correctness": check,
                   "summary": table, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
