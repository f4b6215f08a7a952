#!/usr/bin/env python
"""Quality of the quantized formats against the model as stored: logprob drift, perplexity and greedy agreement.

    python benchmarks/quant_quality.py [--models demo,peaked,parity] [--model DIR ...]
        [--methods int8,int4,fp8,fp8-block] [--dtype float32] [--steps 64] [--out FILE.json]

For each checkpoint, the engine runs the same prompts once as stored (the reference: the checkpoint's own
weights, bf16 for the demo model) and once per quantization method, activations in --dtype (float32 by
default, so that the differences are the weights' quantization alone), greedy, ignore_eos:
  - logprob drift: mean and largest |logprob(quantized) - logprob(reference)| over the prompt tokens;
  - perplexity of the prompt tokens, reference and quantized, and the relative change;
  - greedy agreement: prompts whose --steps generated tokens are all the reference's, and the mean length of
    the common prefix.
For scale, a row "bf16-act" runs the unquantized model with bfloat16 activations: how far rounding alone moves
the same checkpoint (random networks amplify any change; a trained one much less). --kernels auto,torch: each
method on each backend ("auto": the device's quantized kernels, on a CPU the native ones, which quantize
activations to int8 per 128 columns; "torch": dequantize + matmul, the weights' quantization alone); rows of
the torch backend are named "<method>/torch".
Checkpoints: `demo` (the package's default model, trained: scripts/train_demo_model.py; its prompts are
held-out text, tests/data/demo_heldout.txt, so its perplexity is a language model's), `bundled` (the writer's
random `bundled` preset, the package's model before the demo), `peaked` (benchmarks/peaked_checkpoint.py: random
weights trained on the CPU to memorise a corpus, so that next tokens lead clearly as in a trained model; its
prompts are prefixes of that corpus), `parity` (the checkpoints of tests/test_vllm_parity.py, rewritten from
tests/data/vllm_reference.json, with their prompts), and any --model DIR (random ordinary token ids). A method
whose format does not fit a checkpoint's widths (int4 groups of 128, fp8 blocks of 128 rows) is reported with
the reason instead.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "benchmarks"), os.path.join(ROOT, "scripts")):
    if path not in sys.path:
        sys.path.insert(0, path)


def run(path: str, prompts: list[list[int]], method: str | None, dtype: str, steps: int, kernels: str = "auto"):
    from param2moe import LLM, SamplingParams

    llm = LLM(path, dtype=dtype, quantization=method, kv_cache_memory=1 << 28, enable_prefix_caching=False,
              kernels=kernels)
    params = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True, prompt_logprobs=0, detokenize=False)
    return llm.generate(prompts, params, use_tqdm=False)


def compare(ref, got, prompts) -> dict:
    drift, nll_ref, nll_got = [], 0.0, 0.0
    for prompt, a, b in zip(prompts, ref, got):
        for la, lb, tok in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:], prompt[1:]):
            drift.append(abs(la[tok] - lb[tok]))
            nll_ref -= la[tok]
            nll_got -= lb[tok]
    n = len(drift)
    common = []
    for a, b in zip(ref, got):
        x, y = a.outputs[0].token_ids, b.outputs[0].token_ids
        k = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
        common.append(k)
    steps = len(ref[0].outputs[0].token_ids)
    ppl_ref, ppl_got = math.exp(nll_ref / n), math.exp(nll_got / n)
    return {"logprob_drift_mean": sum(drift) / n, "logprob_drift_max": max(drift), "prompt_tokens": n,
            "perplexity_ref": ppl_ref, "perplexity": ppl_got, "perplexity_delta_rel": ppl_got / ppl_ref - 1,
            "greedy_identical": sum(k == steps for k in common), "prompts": len(prompts),
            "greedy_common_prefix_mean": sum(common) / len(common)}


def cases(names: list[str], extra: list[str], tmp: str, peaked: tuple[int, int, int]):
    """(name, checkpoint folder, prompts, notes) for each requested checkpoint."""
    if "demo" in names:
        from param2moe.engine.config import default_model_path

        yield "demo", default_model_path(), _heldout_prompts(default_model_path(), 16), {}
    if "bundled" in names:
        from param2moe.writer import preset_config, write_checkpoint

        path = os.path.join(tmp, "bundled")
        write_checkpoint(path, preset_config("bundled"), seed=0)
        yield "bundled", path, _random_prompts(1024, 16), {}
    if "peaked" in names:
        from peaked_checkpoint import corpus_prompts, make_peaked_checkpoint

        path = os.path.join(tmp, "peaked")
        steps, n_seq, seq_len = peaked
        info = make_peaked_checkpoint(path, "cpu", steps=steps, n_seq=n_seq, seq_len=seq_len)
        corpus = info.pop("corpus")
        notes = {k: info[k] for k in ("steps", "n_seq", "seq_len", "final_loss", "final_accuracy", "train_seconds")}
        yield "peaked", path, corpus_prompts(corpus, 16, min_len=32, max_len=seq_len), notes
    if "parity" in names:
        from make_vllm_reference import make_prompts, write_case

        reference = json.load(open(os.path.join(ROOT, "tests", "data", "vllm_reference.json")))
        for case in reference["cases"]:
            path = os.path.join(tmp, case["name"])
            config = write_case(case, path)
            yield f"parity/{case['name']}", path, make_prompts(config.vocab_size), {}
    for path in extra:
        from param2moe.config import Param2MoEConfig

        yield path, path, _random_prompts(Param2MoEConfig.from_pretrained(path).vocab_size, 16), {}


def _heldout_prompts(path: str, n: int, max_len: int = 256) -> list[list[int]]:
    """The first n pieces of the demo model's held-out text (never trained on), as its tokenizer cuts them."""
    from param2moe.tokenizer import Tokenizer

    tok = Tokenizer(path)
    with open(os.path.join(ROOT, "tests", "data", "demo_heldout.txt"), encoding="utf-8") as f:
        pieces = [p for p in f.read().split("\n\n") if p.strip()]
    return [tok.encode(p, add_special_tokens=False)[:max_len] for p in pieces[:n]]


def _random_prompts(vocab: int, n: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(25, vocab) for _ in range(rng.randrange(16, 120))] for _ in range(n)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="demo,peaked,parity", help="of demo, bundled, peaked, parity")
    p.add_argument("--model", action="append", default=[], help="another checkpoint folder (repeatable)")
    p.add_argument("--methods", default="int8,int4,fp8,fp8-block")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--kernels", default="auto", help="backends to run each method on: auto, torch or both")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--peaked", default="150,4,160", help="the peaked checkpoint's training: steps,sequences,length "
                   "(peaked_checkpoint.py's GPU default 200,8,272 takes ~25 CPU minutes)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    from quant_load_memory import machine

    date = datetime.date.today().isoformat()
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"quant_quality_{date}.json")
    result = {"date": date, "machine": machine(), "command": " ".join(sys.argv), "dtype": args.dtype,
              "steps": args.steps, "kernels": args.kernels, "cases": []}
    print(f"{'checkpoint':>30} {'method':>13} {'drift mean':>10} {'max':>8} {'ppl ref':>9} {'ppl':>9} {'dppl':>7} "
          f"{'greedy same':>11} {'prefix':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        for label, path, prompts, notes in cases(args.models.split(","), args.model, tmp,
                                                  tuple(map(int, args.peaked.split(",")))):
            t = time.perf_counter()
            ref = run(path, prompts, None, args.dtype, args.steps)
            case = {"checkpoint": label, "notes": notes, "methods": {}}
            rows = [(m, k) for m in args.methods.split(",") for k in args.kernels.split(",")]
            for method, kernels in [("bf16-act", "auto"), *rows]:
                name = method if kernels == "auto" else f"{method}/{kernels}"
                try:
                    got = run(path, prompts, None, "bfloat16", args.steps) if method == "bf16-act" else \
                        run(path, prompts, method, args.dtype, args.steps, kernels)
                    row = compare(ref, got, prompts)
                except ValueError as e:  # the format does not fit this checkpoint's widths
                    case["methods"][name] = {"not_applicable": str(e)}
                    print(f"{label:>30} {name:>13}   n/a: {str(e)[:90]}")
                    continue
                case["methods"][name] = row
                print(f"{label:>30} {name:>13} {row['logprob_drift_mean']:>10.5f} {row['logprob_drift_max']:>8.4f} "
                      f"{row['perplexity_ref']:>9.3f} {row['perplexity']:>9.3f} {row['perplexity_delta_rel']:>+7.2%} "
                      f"{row['greedy_identical']:>5}/{row['prompts']:<5} {row['greedy_common_prefix_mean']:>6.1f}",
                      flush=True)
            case["seconds"] = time.perf_counter() - t
            result["cases"].append(case)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
