"""The first token of a 1,024-token prompt with the prefill replayed from a token graph, against the same
prefill launched eagerly, in one process (dummy Param2-17B shapes, one GPU). Run it in several processes:
how long the eager prefill takes depends on how fast the process's host launches its ~300 kernels.
    python3 benchmarks/ttft_graphs.py OUT.json [--input-len 1024] [--samples 6]"""

import argparse
import json
import time

import torch

from param2moe.engine import EngineConfig, LLMEngine, SamplingParams

p = argparse.ArgumentParser()
p.add_argument("output")
p.add_argument("--input-len", type=int, default=1024)
p.add_argument("--samples", type=int, default=6)
args = p.parse_args()

t0 = time.perf_counter()
engine = LLMEngine(EngineConfig(load_format="dummy", preset="param2-17b", max_model_len=4096, max_num_seqs=64,
                                enable_prefix_caching=False))
build_s = time.perf_counter() - t0
graphs = engine.runner.graphs
params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, detokenize=False)
replays = {"n": 0}
run_tokens = graphs.run_tokens


def counted(*a, **k):
    replays["n"] += 1
    return run_tokens(*a, **k)


graphs.run_tokens = counted


def first_token_ms(i: int) -> float:
    engine.add_request(f"p{i}", torch.randint(100, 100000, (args.input_len,)).tolist(), params)
    torch.cuda.synchronize()
    t = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    return (time.perf_counter() - t) * 1e3


result = {"input_len": args.input_len, "engine_build_s": build_s, "token_graph_sizes": graphs.token_sizes}
for variant in ("graph", "eager", "graph", "eager"):  # interleaved, twice
    if variant == "eager":
        graphs.token_graph_size = lambda host: None
    else:
        graphs.__dict__.pop("token_graph_size", None)
    before = replays["n"]
    first_token_ms(-1)  # warm-up of this variant
    samples = [first_token_ms(i) for i in range(args.samples)]
    assert (replays["n"] - before > 0) == (variant == "graph")
    result.setdefault(variant, []).extend(samples)
for variant in ("graph", "eager"):
    xs = sorted(result[variant])
    result[variant + "_median_ms"] = xs[len(xs) // 2]
    print(f"{variant:6s} first token of {args.input_len} tokens: median {xs[len(xs) // 2]:.2f} ms, "
          f"min {xs[0]:.2f}, max {xs[-1]:.2f}")
result["device"] = torch.cuda.get_device_name()
json.dump(result, open(args.output, "w"), indent=1)
