#!/usr/bin/env python
"""Tensor and pipeline parallelism on the GPUs give one GPU's results: a small float32 checkpoint of
the Param2 layout, greedy tokens and logprobs of TP 2, TP 4, EP 2 and PP 2 against one GPU. Twice: with
prompt logprobs (prefills run eagerly), then without (prefills replay token graphs where there are graphs).

    python benchmarks/gpu_parallel_check.py OUT.json [--sizes 2 4]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import traceback

import torch

from param2moe import LLM, SamplingParams
from param2moe.writer import preset_config, write_checkpoint

DEVICE = "cuda"
PARAMS = SamplingParams(temperature=0, max_tokens=24, logprobs=1, prompt_logprobs=0, ignore_eos=True)
PARAMS_NO_PROMPT = SamplingParams(temperature=0, max_tokens=24, logprobs=1, ignore_eos=True)


def run(path, prompts, **kw):
    # few CUDA graphs (batch sizes up to 8): each rank captures its own, with NCCL calls inside
    llm = LLM(path, device=DEVICE, dtype="float32", kv_cache_memory=1 << 28, max_model_len=512, max_num_seqs=8, **kw)
    try:
        # the second batch's prompts are new (not prefix-cache hits of the first): reversed
        return (llm.generate(prompts, PARAMS, use_tqdm=False),
                llm.generate([p[::-1] for p in prompts], PARAMS_NO_PROMPT, use_tqdm=False))
    except BaseException:
        traceback.print_exc()  # before the shutdown, which may wait on ranks stuck in a collective
        raise
    finally:
        llm.llm_engine.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--sizes", type=int, nargs="+", default=[2, 4])
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(30, 2048, (int(n),), generator=g).tolist() for n in (7, 33, 120, 64)]
    cases = {f"tp{n}": dict(tensor_parallel_size=n) for n in args.sizes if n <= torch.cuda.device_count()}
    cases["ep2"] = dict(tensor_parallel_size=2, enable_expert_parallel=True)
    cases["pp2"] = dict(pipeline_parallel_size=2)
    with tempfile.TemporaryDirectory() as tmp:
        # 8 query / 2 KV heads (replicated at TP 4), 16 experts, a shared expert of two experts' width
        cfg = preset_config("small", {"torch_dtype": "float32", "head_dim": 64, "num_attention_heads": 4})
        write_checkpoint(tmp, cfg, seed=4, head_std=0.3)
        t0 = time.perf_counter()
        ref = run(tmp, prompts)
        print(f"one GPU: {time.perf_counter() - t0:.1f} s", flush=True)
        result = {"gpu": torch.cuda.get_device_name(), "gpus": torch.cuda.device_count(), "cases": {}}
        for name, kw in cases.items():
            t0 = time.perf_counter()
            print(f"{name}: starting", flush=True)
            outs = run(tmp, prompts, **kw)
            same = sum(a.outputs[0].token_ids == b.outputs[0].token_ids for r, o in zip(ref, outs)
                       for a, b in zip(r, o))
            diff = max(abs(a[t] - b[t]) for r, o, p in zip(ref[0], outs[0], prompts)
                       for a, b, t in zip(r.prompt_logprobs[1:], o.prompt_logprobs[1:], p[1:]))
            diff2 = max(abs(a[t].logprob - b[t].logprob) for r, o in zip(ref[1], outs[1])
                        for a, b, t in zip(r.outputs[0].logprobs, o.outputs[0].logprobs, r.outputs[0].token_ids))
            n = 2 * len(prompts)
            result["cases"][name] = {"greedy_identical": f"{same}/{n}", "max_prompt_logprob_diff": diff,
                                     "max_sampled_logprob_diff_no_prompt_logprobs": diff2,
                                     "pass": same == n and max(diff, diff2) <= 1e-3}
            verdict = "PASS" if result["cases"][name]["pass"] else "FAIL"
            print(f"{name}: greedy identical {same}/{n}, max prompt-logprob diff {diff:.2e}, sampled-token logprob "
                  f"diff (no prompt logprobs) {diff2:.2e} ({verdict}), {time.perf_counter() - t0:.1f} s", flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
