#!/usr/bin/env python
"""How far int8 on the CPU (native kernels: activations rounded to int8 per row and 128 columns) moves between
parallel layouts, beside unquantized weights for scale (docs/quantization.md, "Loading").

    python benchmarks/quant_parallel_drift.py [--out benchmarks/results/quant_parallel_drift_<date>.json]

A tiny random checkpoint of the Param2 layout (float32; experts 128 wide, so that an expert's width over two TP
ranks is 64, half an activation block), two prompts, 12 greedy tokens, run in one process, with EP 2 and with TP 2
(gloo processes on this CPU). Per layout and weight format: the largest prompt-logprob difference from one
process, the largest generated-token logprob difference over the tokens both runs share a prefix for, and how
many greedy runs are the same. Prints a table and writes JSON (machine, date, commit, command).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CONFIG = {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "intermediate_size": 512,
          "moe_intermediate_size": 128, "moe_shared_expert_intermediate_size": 256, "hidden_size": 256,
          "torch_dtype": "float32"}
PROMPTS = [[5, 9, 2, 7, 1, 3, 8, 4] * 3, [11, 12, 13, 14, 15, 16]]
LAYOUTS = {"one process": {}, "EP 2": {"tensor_parallel_size": 2, "enable_expert_parallel": True},
           "TP 2": {"tensor_parallel_size": 2}}


def run(path: str, **kw):
    from param2moe import LLM, SamplingParams

    llm = LLM(path, kv_cache_memory=1 << 24, dtype="float32", **kw)
    try:
        return llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12, logprobs=0, prompt_logprobs=0),
                            use_tqdm=False)
    finally:
        llm.shutdown()


def compare(one, other) -> dict:
    prompt = max(abs(x[t] - y[t]) for a, b, p in zip(one, other, PROMPTS)
                 for x, y, t in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:], p[1:]))
    generated = 0.0
    for a, b in zip(one, other):
        ta, tb = a.outputs[0].token_ids, b.outputs[0].token_ids
        for i, (x, y) in enumerate(zip(a.outputs[0].logprobs, b.outputs[0].logprobs)):
            if ta[:i + 1] != tb[:i + 1]:
                break
            generated = max(generated, abs(x[ta[i]].logprob - y[tb[i]].logprob))
    same = sum(a.outputs[0].token_ids == b.outputs[0].token_ids for a, b in zip(one, other))
    return {"prompt_logprob_max_diff": prompt, "generated_logprob_max_diff": generated,
            "greedy_same": f"{same}/{len(PROMPTS)}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    a = ap.parse_args()
    from param2moe.writer import preset_config, write_checkpoint

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(tmp, preset_config("tiny", CONFIG), seed=3)
        for quant in ("int8", None):
            outs = {name: run(tmp, quantization=quant, **kw) for name, kw in LAYOUTS.items()}
            for name in list(LAYOUTS)[1:]:
                rows[f"{quant or 'float32 weights'}, {name}"] = compare(outs["one process"], outs[name])
    print(f"{'weights, layout':<26} {'prompt lp diff':>15} {'generated lp diff':>18} {'greedy same':>12}")
    for k, r in rows.items():
        print(f"{k:<26} {r['prompt_logprob_max_diff']:>15.2e} {r['generated_logprob_max_diff']:>18.2e} "
              f"{r['greedy_same']:>12}")
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    date = datetime.date.today().isoformat()
    out = a.out or os.path.join(ROOT, "benchmarks", "results", f"quant_parallel_drift_{date}.json")
    with open(out, "w") as f:
        json.dump({"date": date, "commit": commit, "command": " ".join(sys.argv), "machine": os.uname().nodename,
                   "config": CONFIG, "rows": rows}, f, indent=1)
    print("JSON:", out)


if __name__ == "__main__":
    main()
