#!/usr/bin/env python
"""Where a whole engine step's GPU time goes at one batch size, including what runs outside the
captured decode graph (input copies, sampling, the copy of the sampled ids to the host) and the idle gaps.

    python benchmarks/profile_step.py [--batch 1] [--steps 20]

Dummy Param2-17B weights on the GPU, experts chosen uniformly at random (docs/model.md §7). Prints the median
engine step (host clock), the graph's replay time, and for the last profiled step every GPU event that
is not one of the graph's kernels, each with the idle time before it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from param2moe.engine import EngineConfig, LLMEngine, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    engine = LLMEngine(EngineConfig(preset="param2-17b", load_format="dummy", max_model_len=4096,
                                    max_num_seqs=max(args.batch, 8), uniform_random_routing=True))
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0.0, max_tokens=100000, ignore_eos=True, detokenize=False)
    for i in range(args.batch):
        engine.add_request(f"p{i}", torch.randint(100, 100000, (128,), generator=g).tolist(), params)
    for _ in range(10):  # prefill, then settle into decode
        engine.step()
    times = []
    for _ in range(30):
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    graphs = engine.runner.graphs
    replay = graphs.replay_seconds(args.batch, repeats=50)
    graph = graphs.graphs[next(s for s in graphs.sizes if s >= args.batch)]
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    in_graph = {e.name for e in prof.events() if e.device_type.name == "CUDA"}
    per_replay = sum(1 for e in prof.events() if e.device_type.name == "CUDA")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
    ev = sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    print(f"batch {args.batch}: engine step {statistics.median(times) * 1e3:.3f} ms (host clock, median of 30); "
          f"graph replay {replay * 1e3:.3f} ms; {per_replay} kernels a replay; {len(ev)} GPU events in "
          f"{args.steps} steps")
    # the last few steps: events outside the graph and any gap > 0.5 us
    tail = ev[-3 * (per_replay + 12):]
    end = tail[0].time_range.end
    print(f"{'event':<60} {'idle before':>11} {'dur':>7}")
    idle_total = outside = 0.0
    for e in tail[1:]:
        gap = max(0.0, e.time_range.start - end)
        idle_total += gap
        if e.name not in in_graph or gap > 0.5:
            outside += e.time_range.elapsed_us() if e.name not in in_graph else 0.0
            print(f"{e.name[:60]:<60} {gap:>11.1f} {e.time_range.elapsed_us():>7.1f}"
                  f"{'' if e.name not in in_graph else '  (graph)'}")
        end = max(end, e.time_range.end)
    span = tail[-1].time_range.end - tail[0].time_range.end
    print(f"span {span:.1f} us over ~3 steps: idle {idle_total:.1f} us, outside-graph events {outside:.1f} us")


if __name__ == "__main__":
    main()
