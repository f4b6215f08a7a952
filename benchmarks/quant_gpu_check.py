#!/usr/bin/env python
"""Quantized weights on a GPU: the engine's paths against each other and against vLLM on our exported checkpoints.

    python benchmarks/quant_gpu_check.py [--methods int8,int4,fp8,fp8-block] [--vllm-pythonpath /tmp/site] [--out DIR]

On a small Param2-layout checkpoint trained on the GPU to memorise a corpus (peaked_checkpoint.py, widths that
every format can cut: 128-row blocks of the qkv parts, int4 groups), bf16 activations, prompts that are prefixes
of the corpus, 32 greedy steps. For each method:
  1. graphs: the engine with quantization at load (the device's quantized kernels where there are some, CUDA graphs);
  2. eager: the same with --enforce-eager: greedy tokens identical to 1, prompt logprobs within 1e-2 (PASS/FAIL);
  3. torch: --kernels torch (the dequantize + matmul oracle, eager): agreement with 1 reported;
  4. vllm: `param2moe quantize` writes the compressed-tensors checkpoint and vLLM loads it (with --vllm-pythonpath,
     e.g. the GPU kit's /tmp/site after .peer/vllm_gpu_run.sh): that it loads, and its agreement with 1 and with
     vLLM on the unquantized checkpoint (vLLM runs its own kernels: Marlin for int4/int8, fp8 activations for fp8).
Prints a table; writes quant_gpu_check.json into --out (default $OUT, else benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.join(ROOT, "benchmarks")):
    if p not in sys.path:
        sys.path.insert(0, p)

STEPS, N_PROMPTS = 32, 16
# peaked_checkpoint's model with 4 heads of 64 (q 256 rows, k and v 128: whole fp8 blocks) and 128-wide experts
OVERRIDES = {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64}

_VLLM = r"""
import json, sys
from vllm import LLM, SamplingParams
path, prompts_file, out, steps = sys.argv[1:5]
prompts = json.load(open(prompts_file))
llm = LLM(model=path, dtype="bfloat16", trust_remote_code=True, skip_tokenizer_init=True, enforce_eager=True,
          enable_prefix_caching=False, seed=0, gpu_memory_utilization=0.5, max_model_len=1024)
sp = SamplingParams(temperature=0.0, max_tokens=int(steps), ignore_eos=True, prompt_logprobs=0, logprobs=0)
outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
res = [{"tokens": list(o.outputs[0].token_ids),
        "prompt_logprobs": [None] + [lp[t].logprob for lp, t in zip(o.prompt_logprobs[1:], p[1:])]}
       for o, p in zip(outs, prompts)]
json.dump(res, open(out, "w"))
"""


def ours(path: str, prompts, **kw) -> list[dict]:
    from param2moe import LLM, SamplingParams

    llm = LLM(path, dtype="bfloat16", kv_cache_memory=1 << 30, max_model_len=1024, max_num_seqs=32,
              max_graph_tokens=512, **kw)
    sp = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True, prompt_logprobs=0)
    outs = llm.generate(prompts, sp, use_tqdm=False)
    llm.llm_engine.shutdown()
    return [{"tokens": o.outputs[0].token_ids,
             "prompt_logprobs": [None] + [lp[t] for lp, t in zip(o.prompt_logprobs[1:], p[1:])]}
            for o, p in zip(outs, prompts)]


def vllm(path: str, prompts, pythonpath: str, tmp: str) -> list[dict] | str:
    pfile, out = os.path.join(tmp, "prompts.json"), os.path.join(tmp, "vllm_out.json")
    json.dump(prompts, open(pfile, "w"))
    env = dict(os.environ, PYTHONPATH=pythonpath, VLLM_ENABLE_V1_MULTIPROCESSING="0", HF_HUB_OFFLINE="1",
               VLLM_NO_USAGE_STATS="1", VLLM_USE_FLASHINFER_SAMPLER="0")
    r = subprocess.run([sys.executable, "-c", _VLLM, path, pfile, out, str(STEPS)], env=env, capture_output=True,
                       text=True, timeout=300)
    if r.returncode != 0:
        return "FAILED: " + (r.stderr or r.stdout)[-1500:]
    return json.load(open(out))


def agree(a: list[dict], b: list[dict]) -> dict:
    diffs = [abs(x - y) for u, v in zip(a, b) for x, y in zip(u["prompt_logprobs"][1:], v["prompt_logprobs"][1:])]
    return {"greedy_identical": sum(u["tokens"] == v["tokens"] for u, v in zip(a, b)), "prompts": len(a),
            "logprob_diff_mean": sum(diffs) / len(diffs), "logprob_diff_max": max(diffs)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="int8,int4,fp8,fp8-block")
    ap.add_argument("--vllm-pythonpath", default=None)
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "results"))
    args = ap.parse_args()
    import torch
    from peaked_checkpoint import corpus_prompts, make_peaked_checkpoint

    from param2moe.quant.export import quantize_checkpoint

    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "steps": STEPS, "methods": {}}
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "peaked")
        info = make_peaked_checkpoint(path, "cuda", config_overrides=OVERRIDES)
        prompts = corpus_prompts(info.pop("corpus"), N_PROMPTS, max_len=160)
        result["training"] = {k: info[k] for k in ("final_loss", "final_accuracy", "train_seconds")}
        base_vllm = vllm(path, prompts, args.vllm_pythonpath, tmp) if args.vllm_pythonpath else None
        print(f"{'method':>9} {'eager=graphs':>12} {'torch path':>18} {'vLLM loads':>10} {'vLLM vs ours':>18} "
              f"{'vLLM q vs bf16':>16}")
        for method in args.methods.split(","):
            graphs = ours(path, prompts, quantization=method)
            eager = agree(graphs, ours(path, prompts, quantization=method, enforce_eager=True))
            torch_path = agree(graphs, ours(path, prompts, quantization=method, kernels="torch", enforce_eager=True))
            passed = eager["greedy_identical"] == len(prompts) and eager["logprob_diff_max"] <= 1e-2
            ok &= passed
            row = {"eager_vs_graphs": eager, "torch_path_vs_graphs": torch_path, "pass": passed}
            loads = vs_ours = vs_bf16 = "-"
            if args.vllm_pythonpath:
                qdir = os.path.join(tmp, f"q-{method}")
                quantize_checkpoint(path, qdir, method, progress=False)
                got = vllm(qdir, prompts, args.vllm_pythonpath, tmp)
                if isinstance(got, str):
                    row["vllm"], loads = got, "FAILED"
                else:
                    row["vllm_vs_ours"], loads = agree(got, graphs), "yes"
                    vs_ours = f"{row['vllm_vs_ours']['greedy_identical']}/{len(prompts)} " \
                              f"{row['vllm_vs_ours']['logprob_diff_mean']:.4f}"
                    if not isinstance(base_vllm, str):
                        row["vllm_quantized_vs_vllm_bf16"] = agree(got, base_vllm)
                        vs_bf16 = f"{row['vllm_quantized_vs_vllm_bf16']['greedy_identical']}/{len(prompts)}"
            result["methods"][method] = row
            print(f"{method:>9} {'PASS' if passed else 'FAIL':>12} "
                  f"{torch_path['greedy_identical']:>3}/{len(prompts)} {torch_path['logprob_diff_max']:.4f} max "
                  f"{loads:>10} {vs_ours:>18} {vs_bf16:>16}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "quant_gpu_check.json"), "w") as f:
        json.dump(result, f, indent=2)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
