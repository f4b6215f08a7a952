#!/usr/bin/env python
"""Where a decode step's GPU time goes: torch.profiler over replays of the captured decode graph.

    python benchmarks/profile_decode.py [--batch 1 64] [--no-fold] [--top 25] [--quantization fp8]

Dummy Param2-17B weights on the GPU, experts chosen uniformly at random (docs/model.md §7), prompts of 128
tokens. Prints, per batch size, the GPU time of one replay and its kernels (time per step, launches
per step), sorted by time. --no-fold keeps the shared expert as its own MLP (not folded into the
fused MoE: MoE.fold_shared_experts), to compare the two.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from param2moe.engine import EngineConfig, LLMEngine, SamplingParams
from param2moe.model.network import Param2MoEForCausalLM


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--no-fold", action="store_true")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--replays", type=int, default=10)
    ap.add_argument("--quantization", default=None, help="quantized weights (int8, int4, fp8, fp8-block)")
    ap.add_argument("--quantize-head", action="store_true", help="with --quantization: the head too")
    ap.add_argument("--timeline", type=int, nargs=2, metavar=("FIRST", "LAST"),
                    help="also print kernels FIRST..LAST of the last replay in time order: start, duration, and "
                         "how far each moved the end of the step (its cost on the critical path)")
    args = ap.parse_args()
    if args.no_fold:
        Param2MoEForCausalLM.fold_shared_experts = lambda self: 0
    engine = LLMEngine(EngineConfig(preset="param2-17b", load_format="dummy", max_model_len=4096,
                                    max_num_seqs=max(args.batch), quantization=args.quantization,
                                    quantize_head=args.quantize_head))
    graphs = engine.runner.graphs
    g = torch.Generator().manual_seed(0)
    for b in args.batch:
        for i in range(b):  # fill the static buffers with a real decode batch of this size
            ids = torch.randint(100, 100000, (128,), generator=g).tolist()
            engine.add_request(f"p{b}-{i}", ids, SamplingParams(max_tokens=3, ignore_eos=True, detokenize=False))
        while engine.has_unfinished_requests():
            engine.step()
        step_s = graphs.replay_seconds(b, repeats=50)
        graph = graphs.graphs[next(s for s in graphs.sizes if s >= b)]
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.replays):
                graph.replay()
            torch.cuda.synchronize()
        rows = [e for e in prof.key_averages() if e.device_time_total > 0]
        rows.sort(key=lambda e: -e.device_time_total)
        total = sum(e.device_time_total for e in rows) / args.replays
        launches = sum(e.count for e in rows) / args.replays
        what = (" (shared expert not folded)" if args.no_fold else "") + \
            (f", {args.quantization}" if args.quantization else "")
        print(f"\n== batch {b}{what}: replay {step_s * 1e3:.3f} ms "
              f"(events); kernels {total / 1e3:.3f} ms, {launches:.0f} launches per step")
        print(f"{'kernel':<60} {'us/step':>9} {'launches':>9} {'us each':>8}")
        for e in rows[: args.top]:
            n = e.count / args.replays
            print(f"{e.key[:60]:<60} {e.device_time_total / args.replays:>9.1f} {n:>9.0f} "
                  f"{e.device_time_total / e.count:>8.2f}")
        if args.timeline:
            _timeline(prof, round(launches), *args.timeline)


def _timeline(prof, per_step: int, first: int, last: int) -> None:
    """Kernels of the last replay in start order. With programmatic dependent launch a kernel starts
    before the one in front ends (its duration includes the wait): "adds" is how much later the step's
    running end is after it than before it."""
    kernels = sorted((e for e in prof.events() if e.device_type.name == "CUDA" and e.device_time_total > 0),
                     key=lambda e: e.time_range.start)[-per_step:]
    t0 = kernels[0].time_range.start
    end = t0
    print(f"{'#':>4} {'kernel':<44} {'start':>8} {'dur':>7} {'adds':>7}")
    for i, e in enumerate(kernels):
        new_end = max(end, e.time_range.end)
        if first <= i <= last:
            print(f"{i:>4} {e.name[:44]:<44} {e.time_range.start - t0:>8.1f} {e.time_range.elapsed_us():>7.1f} "
                  f"{new_end - end:>7.1f}")
        end = new_end


if __name__ == "__main__":
    main()
