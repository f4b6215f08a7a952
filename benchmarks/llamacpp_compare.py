#!/usr/bin/env python
"""param2moe against llama.cpp on the CPU, on the same checkpoint, in one run.

    python benchmarks/llamacpp_compare.py build           # once: llama.cpp from the llama-cpp-python sdist
    python benchmarks/llamacpp_compare.py agree           # float32 agreement on a small checkpoint
    python benchmarks/llamacpp_compare.py bench [--repeats 2]   # speed: cpu_bench.py's 46.7M checkpoint
    python benchmarks/llamacpp_compare.py ppl --ckpt DIR --text FILE    # perplexity by format, both engines

build: `pip download --no-binary :all: --no-deps llama-cpp-python` into .llamacpp/ (ignored by git), cmake of its
    vendored llama.cpp (CPU only, Release, GGML_NATIVE=ON; on CPUs with AMX the same features named one by one
    without AMX, whose int8 path crashes here: see isa_options), the tools llama-bench, llama-batched-bench,
    llama-perplexity, llama-quantize (`-j2`: the machine's two cores; about an hour); a venv .llamacpp/venv with
    what its convert_hf_to_gguf.py needs (and llama-cpp-python's ctypes bindings, read from the sdist, for logits).
    Nothing of llama.cpp is committed.

Conversion (convert_hf_to_gguf.py, as BailingMoeV2) needs three workarounds for Param-2's checkpoints, made in a
temporary copy of the folder (weights linked, not copied):
  - the head is tied (tie_word_embeddings): there is no lm_head.weight, and llama.cpp's BailingMoeV2 requires
    output.weight -> the copy gets a shard holding lm_head.weight = the embedding;
  - moe_shared_expert_intermediate_size is the total width of the shared experts (docs/model.md §3.4), and llama.cpp
    multiplies it by num_shared_experts again -> the copy's config gets total / num_shared_experts;
  - the tokenizer's pre-tokenizer is not one the converter knows by hash -> it is named (--pre-tokenizer,
    default gpt-2: a plain ByteLevel pre-tokenizer with GPT-2's regex, as the writer's tokenizer.json has);
  and its config says architectures ["BailingMoeV2ForCausalLM"].
llama.cpp's flash attention (on by default) keeps K/V in f16: precision comparisons run with flash attention off
and an f32 KV cache (`-fa off -ctk f32 -ctv f32`, the bindings' equivalents).

agree: a float32 checkpoint of the layout (writer preset "small"; --ckpt to use another) converted to an f32 GGUF;
    the same random token ids through both engines (param2moe: prompt_logprobs; llama.cpp: all logits),
    compared per position: the log-probability of the next token, and the top-1 token. Without --ckpt / --set,
    also variants of the layout (AGREE_VARIANTS: partial RoPE, grouped routing, unnormalized and unscaled
    routing weights, softmax scores).
bench: cpu_bench.py's checkpoint (46.7M parameters, bf16; or --ckpt) converted to bf16, Q8_0 and Q4_0 GGUFs; per format,
    batch-1 decode (ms a token after a --input-len prompt) and 16-sequence throughput (output tokens/s over the
    whole run, prefill included), param2moe (bf16, int8, int4: `quantization=`) beside llama.cpp (bf16, Q8_0,
    Q4_0: llama-bench tg at depth --input-len, llama-batched-bench), back to back, best of --repeats.
ppl: the checkpoint in bf16 / int8 / int4 (ours) and BF16 / Q8_0 / Q4_0 (llama.cpp): perplexity of the same token
    windows of --text (tokenized by the checkpoint's tokenizer; token ids to both engines), and each format's
    difference from its engine's bf16.
Results: a table, and JSON in benchmarks/results/llamacpp_compare_<what>_<date>.json (machine, date, commit,
commands).
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import cpu_bench  # noqa: E402  (this folder: the checkpoint, the worker, the machine facts)

WORK = os.path.join(ROOT, ".llamacpp")
BUILD = os.path.join(WORK, "build")
BIN = os.path.join(BUILD, "bin")
VENV_PY = os.path.join(WORK, "venv", "bin", "python")
TOOLS = ("llama-bench", "llama-batched-bench", "llama-perplexity", "llama-quantize")
CONVERTER_DEPS = ["torch==2.13.0", "transformers>=4.57,<5", "sentencepiece", "protobuf<5", "numpy", "pyyaml",
                  "tqdm", "jinja2", "typing_extensions", "diskcache", "safetensors"]
# name, ours, llama.cpp (int4-k: our int4 against llama.cpp's K-quant mix Q4_K_M)
FORMATS = (("bf16", None, "BF16"), ("int8", "int8", "Q8_0"), ("int4", "int4", "Q4_0"), ("int4-k", "int4", "Q4_K_M"))


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    log("$", " ".join(cmd))
    return subprocess.run(cmd, check=True, **kw)


def sdist_dir() -> str:
    found = sorted(glob.glob(os.path.join(WORK, "llama_cpp_python-*", "vendor", "llama.cpp")))
    if not found:
        raise SystemExit(f"no llama.cpp source under {WORK}: run `{sys.argv[0]} build` first")
    return found[-1]


# ================================================================== build
def build(jobs: int) -> None:
    os.makedirs(WORK, exist_ok=True)
    if not glob.glob(os.path.join(WORK, "llama_cpp_python-*", "vendor", "llama.cpp")):
        run([sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps", "llama-cpp-python",
             "-d", WORK])
        tarball = sorted(glob.glob(os.path.join(WORK, "llama_cpp_python-*.tar.gz")))[-1]
        run(["tar", "xzf", tarball, "-C", WORK])
    src = sdist_dir()
    if not all(os.path.exists(os.path.join(BIN, t)) for t in TOOLS):
        run(["cmake", "-S", src, "-B", BUILD, "-DCMAKE_BUILD_TYPE=Release", *isa_options(), "-DGGML_CUDA=OFF",
             "-DGGML_METAL=OFF", "-DGGML_VULKAN=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
             "-DLLAMA_BUILD_SERVER=OFF"], stdout=subprocess.DEVNULL)
        run(["cmake", "--build", BUILD, f"-j{jobs}", "--target", *TOOLS, "llama"], stdout=subprocess.DEVNULL)
    if not os.path.exists(VENV_PY):
        run([sys.executable, "-m", "venv", os.path.join(WORK, "venv")])
        run([VENV_PY, "-m", "pip", "install", "-q", *CONVERTER_DEPS])
    log(f"llama.cpp tools in {BIN}; converter venv {VENV_PY}")


# x86 features ggml can be told one by one (GGML_NATIVE=OFF), by their /proc/cpuinfo names.
_GGML_ISA = {"avx": "AVX", "avx2": "AVX2", "fma": "FMA", "f16c": "F16C", "bmi2": "BMI2", "avx512f": "AVX512",
             "avx512vbmi": "AVX512_VBMI", "avx512_vnni": "AVX512_VNNI", "avx512_bf16": "AVX512_BF16",
             "avx_vnni": "AVX_VNNI"}


def isa_options() -> list[str]:
    """-DGGML_NATIVE=ON, except on CPUs with AMX: there llama.cpp's AMX int8 matmul (Q4_0 / Q8_0 weights at more
    than one token a product: prompts, batches) dies with SIGILL at a tileloadd on this machine (cause not
    found; the machine's AMX itself works: param2moe's tiles run here), so those builds name -march=native's
    other features one by one, AMX off."""
    flags = set(_proc_flags())
    if "amx_int8" not in flags:
        return ["-DGGML_NATIVE=ON"]
    return ["-DGGML_NATIVE=OFF", *(f"-DGGML_{v}={'ON' if k in flags else 'OFF'}" for k, v in _GGML_ISA.items()),
            "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]


def _proc_flags() -> list[str]:
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])


def tool(name: str) -> str:
    path = os.path.join(BIN, name)
    if not os.path.exists(path):
        raise SystemExit(f"{path} missing: run `{sys.argv[0]} build` first")
    return path


# ================================================================== conversion
# Runs in the converter's venv: convert_hf_to_gguf.main() with the pre-tokenizer named.
_CONVERT = """
import sys
src, pre = sys.argv[1], sys.argv[2]
sys.path[:0] = [src, src + "/gguf-py"]
from conversion import base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
import convert_hf_to_gguf
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[3:]]
convert_hf_to_gguf.main()
"""


def patched_copy(ckpt: str, out: str) -> None:
    """`out`: ckpt's files linked, with the config and the head patched for llama.cpp (see the top)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    ckpt = os.path.abspath(ckpt)  # the links must not be relative to the copy
    os.makedirs(out, exist_ok=True)
    for f in os.listdir(ckpt):
        if f != "config.json":
            os.symlink(os.path.join(ckpt, f), os.path.join(out, f))
    with open(os.path.join(ckpt, "config.json")) as f:
        cfg = json.load(f)
    cfg["architectures"] = ["BailingMoeV2ForCausalLM"]
    cfg.pop("auto_map", None)
    shared = cfg.get("num_shared_experts") or 0
    if shared > 1 and cfg.get("moe_shared_expert_intermediate_size"):
        cfg["moe_shared_expert_intermediate_size"] //= shared  # llama.cpp multiplies by the count again
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    names = {}
    for part in glob.glob(os.path.join(ckpt, "*.safetensors")):
        with safe_open(part, framework="pt") as st:
            names.update({k: part for k in st.keys()})
    if "lm_head.weight" in names:
        return
    emb = next(k for k in names if k.endswith("word_embeddings.weight") or k.endswith("embed_tokens.weight"))
    with safe_open(names[emb], framework="pt") as st:
        head = st.get_tensor(emb)
    save_file({"lm_head.weight": head.clone()}, os.path.join(out, "model-lm_head.safetensors"))
    index = os.path.join(ckpt, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            idx = json.load(f)
        idx["weight_map"]["lm_head.weight"] = "model-lm_head.safetensors"
        os.unlink(os.path.join(out, "model.safetensors.index.json"))
        with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
            json.dump(idx, f)


def convert(ckpt: str, out_dir: str, outtype: str, pre_tokenizer: str) -> str:
    """ckpt as a GGUF of outtype (f32, bf16) in out_dir."""
    out = os.path.join(out_dir, f"model-{outtype}.gguf")
    with tempfile.TemporaryDirectory(prefix="p2m-gguf-src-") as tmp:
        patched_copy(ckpt, tmp)
        run([VENV_PY, "-c", _CONVERT, sdist_dir(), pre_tokenizer, tmp, "--outtype", outtype, "--outfile", out],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL if not os.environ.get("P2M_VERBOSE") else None)
    return out


def quantize(gguf: str, qtype: str) -> str:
    out = gguf.replace(".gguf", f"-{qtype}.gguf")
    run([tool("llama-quantize"), gguf, out, qtype], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


# ================================================================== agreement
# Runs in the converter's venv: llama.cpp's log-probabilities of each next token (and its argmax), through the
# llama-cpp-python bindings of the sdist on the library built here; flash attention off, f32 KV cache.
_LLAMA_LOGPROBS = """
import json, sys
import numpy as np
import llama_cpp
gguf, seqs, threads = sys.argv[1], json.load(open(sys.argv[2])), int(sys.argv[3])
n = max(len(t) for t in seqs)
llm = llama_cpp.Llama(gguf, n_ctx=n + 8, n_batch=n, n_ubatch=n, logits_all=True, n_threads=threads,
                      n_threads_batch=threads, flash_attn=False, type_k=llama_cpp.GGML_TYPE_F32,
                      type_v=llama_cpp.GGML_TYPE_F32, verbose=False)
out = []
for tokens in seqs:
    llm.reset()
    llm.eval(tokens)
    s = np.asarray(llm.scores[:len(tokens) - 1], dtype=np.float64)
    lp = s - s.max(1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(1, keepdims=True))
    nxt = np.asarray(tokens[1:])
    out.append({"logprob": lp[np.arange(len(nxt)), nxt].tolist(), "top1": s.argmax(1).tolist()})
print(json.dumps(out))
"""


def llama_logprobs(gguf: str, seqs: list[list[int]], threads: int) -> list[dict]:
    """Per sequence: llama.cpp's log-probability of each next token, and its top-1 token (all logits kept)."""
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(sdist_dir())), "LLAMA_CPP_LIB_PATH": BIN}
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(seqs, f)
        f.flush()
        r = subprocess.run([VENV_PY, "-c", _LLAMA_LOGPROBS, gguf, f.name, str(threads)], env=env,
                           capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"llama.cpp logprobs of {gguf} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def ours_logprobs(ckpt: str, seqs: list[list[int]], dtype: str, quantization: str | None = None) -> list[dict]:
    """The same from param2moe (prompt_logprobs)."""
    from param2moe import LLM, SamplingParams

    kw = {"quantization": quantization} if quantization else {}
    llm = LLM(ckpt, dtype=dtype, max_model_len=max(len(t) for t in seqs) + 8, enable_prefix_caching=False, **kw)
    sp = SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0.0)
    res = []
    for tokens, out in zip(seqs, llm.generate([{"prompt_token_ids": t} for t in seqs], sp, use_tqdm=False)):
        entries = out.prompt_logprobs[1:]  # entry i: the distribution before token i
        res.append({"logprob": [float(e[t].logprob) for t, e in zip(tokens[1:], entries)],
                    "top1": [next(t for t, v in e.items() if v.rank == 1) for e in entries]})
    return res


# Layout variants of the small checkpoint checked by default: each a feature the two engines could read
# differently (the converter's defaults, the grouped router, the routing weights).
AGREE_VARIANTS = ([], ["partial_rotary_factor=0.5"], ["n_group=4", "topk_group=2"], ["norm_topk_prob=false"],
                  ["routed_scaling_factor=1.0"], ['score_function="softmax"', "moe_router_enable_expert_bias=false"])


def agree_one(a, sets: list[str]) -> dict:
    """One checkpoint (a.ckpt, or the small preset in float32 with `sets` applied) through both engines."""
    import random

    from param2moe.writer import preset_config, write_checkpoint

    with tempfile.TemporaryDirectory(prefix="p2m-agree-") as tmp:
        ckpt = a.ckpt
        if not ckpt:
            ckpt = os.path.join(tmp, "ckpt")
            over = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in sets)}
            write_checkpoint(ckpt, preset_config("small", {"torch_dtype": "float32", **over}), seed=0)
        with open(os.path.join(ckpt, "config.json")) as f:
            vocab = json.load(f)["vocab_size"]
        rng = random.Random(0)
        tokens = [rng.randrange(25, vocab) for _ in range(a.tokens)]
        gguf = convert(ckpt, tmp, "f32", a.pre_tokenizer)
        theirs = llama_logprobs(gguf, [tokens], a.threads)[0]
        ours = ours_logprobs(ckpt, [tokens], "float32")[0]
    diffs = [abs(x - y) for x, y in zip(ours["logprob"], theirs["logprob"])]
    same = sum(x == y for x, y in zip(ours["top1"], theirs["top1"]))
    res = {"checkpoint": a.ckpt or "writer preset small, float32, seed 0", "config_changes": sets,
           "tokens": len(tokens), "logprob_abs_diff_max": max(diffs), "logprob_abs_diff_mean": sum(diffs) / len(diffs),
           "top1_agreement": same / len(diffs), "mean_logprob_ours": sum(ours["logprob"]) / len(diffs),
           "mean_logprob_llamacpp": sum(theirs["logprob"]) / len(diffs)}
    print(f"float32 {' '.join(sets) or '(as written)'}, {len(tokens)} tokens: |logprob difference| max "
          f"{res['logprob_abs_diff_max']:.2e}, mean {res['logprob_abs_diff_mean']:.2e}; top-1 agreement "
          f"{res['top1_agreement']:.1%}", flush=True)
    return res


def agree(a) -> list[dict]:
    variants = [a.set] if a.set or a.ckpt else AGREE_VARIANTS
    return [agree_one(a, sets) for sets in variants]


# ================================================================== perplexity
def text_chunks(path: str, ckpt: str, ctx: int, max_tokens: int) -> list[list[int]]:
    """The file's texts (a .jsonl of {"text": ...} lines, or plain text), tokenized with the checkpoint's
    tokenizer, concatenated (EOS between texts) and cut into windows of ctx tokens."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(ckpt, "tokenizer.json"))
    with open(os.path.join(ckpt, "config.json")) as f:
        eos = json.load(f).get("eos_token_id", 3)
    with open(path) as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()] if path.endswith(".jsonl") else [f.read()]
    ids: list[int] = []
    for t in texts:
        ids += tok.encode(t).ids + [eos]
        if len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens]
    return [ids[i:i + ctx] for i in range(0, len(ids) - ctx + 1, ctx)]


def llama_cannot_load(ckpt: str) -> str | None:
    """Why llama.cpp cannot run this checkpoint, or None: its BailingMoeV2 graph sizes the query projection by the
    hidden size (src/models/bailingmoe2.cpp: attn_qkv {n_embd, n_embd + 2 * n_embd_gqa}), so it refuses layouts
    whose heads * head_dim differs from hidden_size (the trained demo model: 4 x 64 heads on hidden 192)."""
    with open(os.path.join(ckpt, "config.json")) as f:
        cfg = json.load(f)
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    head_dim = cfg.get("head_dim") or hidden // heads
    if heads * head_dim != hidden:
        return (f"llama.cpp's BailingMoeV2 needs num_attention_heads * head_dim == hidden_size; this checkpoint has "
                f"{heads} x {head_dim} = {heads * head_dim} on hidden {hidden} (its loader: 'tensor blk.0.attn_qkv."
                f"weight has wrong shape')")
    return None


def perplexity(a) -> dict:
    """Perplexity of the same token windows in each format, both engines (every token after a window's first
    scored; the token ids given to both, so their tokenizers play no part)."""
    import math

    from param2moe.quant.formats import QuantFormatError

    chunks = text_chunks(a.text, a.ckpt, a.ctx, a.max_tokens)
    if not chunks:
        raise SystemExit(f"--text {a.text}: fewer than --ctx {a.ctx} tokens")
    res: dict[str, dict] = {}

    def ppl(outs):
        lps = [x for o in outs for x in o["logprob"]]
        return {"ppl": math.exp(-sum(lps) / len(lps)), "tokens_scored": len(lps)}

    unloadable = llama_cannot_load(a.ckpt)
    with tempfile.TemporaryDirectory(prefix="p2m-ppl-") as tmp:
        ggufs = {}
        if not unloadable:
            ggufs["BF16"] = convert(a.ckpt, tmp, "bf16", a.pre_tokenizer)
            for _, _, q in FORMATS[1:]:
                ggufs[q] = quantize(ggufs["BF16"], q)
        for name, ours_q, theirs_q in FORMATS:
            if name == "int4-k":  # ours: the int4 row above
                ours = res["param2moe int4"]
            else:
                try:
                    ours = res[f"param2moe {name}"] = ppl(ours_logprobs(a.ckpt, chunks, "bfloat16", ours_q))
                except QuantFormatError as e:  # e.g. int4 on widths that are not multiples of its group (128)
                    ours = res[f"param2moe {name}"] = {"ppl": None, "skipped": str(e)}
            theirs = res[f"llama.cpp {theirs_q}"] = {"ppl": None, "skipped": unloadable} if unloadable else \
                ppl(llama_logprobs(ggufs[theirs_q], chunks, a.threads))
            log(f"{name}: ours {ours['ppl'] or ours['skipped']}, llama.cpp {theirs['ppl'] or theirs['skipped']}")
    for engine, base in (("param2moe", "param2moe bf16"), ("llama.cpp", "llama.cpp BF16")):
        for k, v in res.items():
            if k.startswith(engine) and v["ppl"] is not None and res[base]["ppl"] is not None:
                v["delta_vs_bf16"] = v["ppl"] - res[base]["ppl"]
    return {"checkpoint": a.ckpt, "text": a.text, "ctx": a.ctx, "windows": len(chunks), "results": res}


def ppl_table(res: dict) -> str:
    lines = ["| engine, format | perplexity | delta vs its bf16 |", "|---|---|---|"]
    for k, v in res["results"].items():
        if v["ppl"] is None:
            lines.append(f"| {k} | - ({v['skipped'][:100]}) | - |")
        else:
            lines.append(f"| {k} | {v['ppl']:.3f} | {v['delta_vs_bf16']:+.3f} |")
    return "\n".join(lines)


# ================================================================== speed
def _child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_cpu(cmd: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    """run(cmd), and the CPU seconds the command used (user + system)."""
    c = _child_cpu()
    r = run(cmd, capture_output=True, text=True)
    return r, _child_cpu() - c


def _batched_row(table: str, npl: int) -> dict:
    """llama-batched-bench's markdown row for npl sequences (its jsonl output went missing with two threads
    here), as {"pp", "tg", "pl", "n_kv", "t_pp", "speed_pp", "t_tg", "speed_tg", "t", "speed"}."""
    keys = ("pp", "tg", "pl", "n_kv", "t_pp", "speed_pp", "t_tg", "speed_tg", "t", "speed")
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == len(keys) and cells[0].isdigit() and int(cells[2]) == npl:
            return dict(zip(keys, map(float, cells)))
    raise RuntimeError(f"llama-batched-bench printed no row for {npl} sequences:\n{table[-2000:]}")


def llama_bench(gguf: str, a) -> dict:
    """Batch-1 decode after an --input-len context (llama-bench tg at that depth) and 16-sequence throughput
    (llama-batched-bench: --output-len tokens each after an --input-len prompt, output tokens over the whole
    time). Also in CPU time: per decode token, the CPU seconds of a run of 3x the tokens less those of a run of
    1x, over 2x tokens; the batched run's CPU seconds less those of a load-only run (for a shared machine)."""
    n = a.latency_output_len
    bench = [tool("llama-bench"), "-m", gguf, "-t", str(a.threads), "-p", "0", "-d", str(a.input_len), "-o", "json"]
    r, _ = run_cpu([*bench, "-n", str(n), "-r", "3"])
    tg = json.loads(r.stdout)[0]
    _, c1 = run_cpu([*bench, "-n", str(n), "-r", "1"])
    _, c3 = run_cpu([*bench, "-n", str(3 * n), "-r", "1"])
    npl = a.num_seqs
    batched = [tool("llama-batched-bench"), "-m", gguf, "-t", str(a.threads), "-tb", str(a.threads),
               "-c", str(npl * (a.input_len + a.output_len) + 64), "-b", "2048", "-ub", "512"]
    for attempt in range(3):  # now and then it prints its table's header and no row (two threads here): again
        r, cb = run_cpu([*batched, "-npp", str(a.input_len), "-ntg", str(a.output_len), "-npl", str(npl)])
        try:
            row = _batched_row(r.stdout, npl)
            break
        except RuntimeError:
            if attempt == 2:
                raise
            log("llama-batched-bench printed no row; running it again")
    _, c0 = run_cpu([*batched, "-npp", "1", "-ntg", "1", "-npl", "1"])
    out_tokens = npl * a.output_len
    return {"tpot_ms": 1e3 / tg["avg_ts"], "tg_tok_s": tg["avg_ts"], "tpot_cpu_ms": 1e3 * (c3 - c1) / (2 * n),
            "throughput_output_tok_s": out_tokens / row["t"], "output_tok_per_cpu_s": out_tokens / (cb - c0),
            "batched_row": row, "llama_bench": {k: tg.get(k) for k in ("n_threads", "type_k", "flash_attn",
                                                                        "cpu_info", "build_commit")}}


def ours_bench(ckpt: str, quantization: str | None, a, copied: bool = False) -> dict:
    """cpu_bench.py's worker (a fresh process): latency at batch 1, throughput of --num-seqs requests; copied: the
    weights copied into the process rather than left in the mapped files."""
    args = argparse.Namespace(
        dtype="bfloat16", max_model_len=1024, max_num_seqs=a.num_seqs, max_num_batched_tokens=2048, kv_gib=1,
        num_requests=a.num_seqs, input_len=a.input_len, output_len=a.output_len,
        latency_output_len=a.latency_output_len, wait_idle=a.wait_idle, quantization=quantization,
        quantize_head=a.quantize_head, no_mmap_weights=copied)
    res = cpu_bench.run_worker("param2moe", sys.executable, args, ckpt)
    lat, thr = res["latency"], res["throughput"]
    return {"tpot_ms": lat["tpot_ms"], "throughput_output_tok_s": thr["output_tok_s"], "ttft_ms": lat["ttft_ms"],
            "tpot_cpu_ms": lat["tpot_cpu_ms"], "output_tok_per_cpu_s": thr["output_tok_per_cpu_s"],
            "others_cpu_share": res["others_cpu_share"], "raw": res}


def bench(a) -> dict:
    os.environ["OMP_NUM_THREADS"] = str(a.threads)  # our workers (fresh processes) use as many threads as llama.cpp
    with tempfile.TemporaryDirectory(prefix="p2m-llamacpp-bench-", dir=a.tmp) as tmp:
        ckpt = a.ckpt or os.path.join(tmp, "ckpt")
        n_params = checkpoint_parameters(ckpt) if a.ckpt else cpu_bench.write_model(ckpt, "bfloat16", seed=0)
        ggufs = {"BF16": convert(ckpt, tmp, "bf16", a.pre_tokenizer)}
        for _, _, q in FORMATS[1:]:
            ggufs[q] = quantize(ggufs["BF16"], q)
        sizes = {q: os.path.getsize(p) for q, p in ggufs.items()}
        formats = [f for f in FORMATS if f[0] in a.formats.split(",")]
        runs: dict[str, list] = {}
        for rep in range(a.repeats):
            for name, ours_q, theirs_q in formats:  # back to back: ours, then llama.cpp, per format
                log(f"[{rep + 1}/{a.repeats}] {name}")
                runs.setdefault(f"param2moe {name}", []).append(ours_bench(ckpt, ours_q, a))
                if a.copied:
                    runs.setdefault(f"param2moe {name}, copied", []).append(ours_bench(ckpt, ours_q, a, copied=True))
                runs.setdefault(f"llama.cpp {theirs_q}", []).append(llama_bench(ggufs[theirs_q], a))
    best = {k: {"tpot_ms": min(r["tpot_ms"] for r in v),
                "throughput_output_tok_s": max(r["throughput_output_tok_s"] for r in v),
                "tpot_cpu_ms": min(r["tpot_cpu_ms"] for r in v),
                "output_tok_per_cpu_s": max(r["output_tok_per_cpu_s"] for r in v), "runs": v}
            for k, v in runs.items()}
    return {"checkpoint": a.ckpt or "cpu_bench.py's (46.7M)", "parameters": n_params, "gguf_bytes": sizes,
            "results": best}


def checkpoint_parameters(ckpt: str) -> int:
    from safetensors import safe_open

    n = 0
    for part in glob.glob(os.path.join(ckpt, "*.safetensors")):
        with safe_open(part, framework="pt") as st:
            for k in st.keys():
                shape = st.get_slice(k).get_shape()
                n += math.prod(shape)
    return n


def bench_table(res: dict) -> str:
    lines = ["| engine, format | batch-1 decode ms/token | 16-seq output tok/s | batch-1 CPU ms/token | "
             "16-seq output tok per CPU s |", "|---|---|---|---|---|"]
    for k, v in res["results"].items():
        lines.append(f"| {k} | {v['tpot_ms']:.2f} | {v['throughput_output_tok_s']:.1f} | {v['tpot_cpu_ms']:.2f} | "
                     f"{v['output_tok_per_cpu_s']:.1f} |")
    return "\n".join(lines)


# ================================================================== main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["build", "agree", "bench", "ppl"])
    ap.add_argument("--jobs", type=int, default=2, help="build: parallel compile jobs")
    ap.add_argument("--ckpt", help="agree: this checkpoint (float32) instead of a fresh small one; ppl: the model; "
                    "bench: this bf16 checkpoint instead of cpu_bench.py's (e.g. `param2moe make-checkpoint DIR "
                    "--preset param2-17b --set num_hidden_layers=4`: Param-2 17B's shapes, cut)")
    ap.add_argument("--tmp", help="bench: where the GGUFs go (default: the system's temporary folder)")
    ap.add_argument("--text", help="ppl: a .jsonl of {\"text\": ...} lines, or a text file")
    ap.add_argument("--ctx", type=int, default=256, help="ppl: window length in tokens")
    ap.add_argument("--max-tokens", type=int, default=16384, help="ppl: tokens of --text used at most")
    ap.add_argument("--tokens", type=int, default=96, help="agree: sequence length")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help="agree: a config value of the small checkpoint (e.g. partial_rotary_factor=0.5); only this")
    ap.add_argument("--pre-tokenizer", default="gpt-2", help="the pre-tokenizer name the converter is given")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--formats", default="bf16,int8,int4", help="bench: of bf16, int8, int4, int4-k (Q4_K_M)")
    ap.add_argument("--quantize-head", action="store_true",
                    help="bench: param2moe's head quantized too (llama-quantize makes it Q8_0 / Q6_K; ours stays bf16 "
                         "without this)")
    ap.add_argument("--num-seqs", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--latency-output-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--copied", action="store_true",
                    help="bench: also param2moe with its weights copied (--no-mmap-weights) beside the mapped default")
    ap.add_argument("--wait-idle", type=float, default=60)
    ap.add_argument("--nice", type=int, default=0,
                    help="scheduling priority change for this run and every process it starts, both engines alike "
                         "(negative: ahead of the machine's other jobs; needs root)")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/llamacpp_compare_<what>_<date>.json)")
    a = ap.parse_args()
    if a.what == "build":
        return build(a.jobs)
    if a.nice:
        os.nice(a.nice)
    t0 = time.time()
    if a.what == "ppl" and not (a.ckpt and a.text):
        raise SystemExit("ppl needs --ckpt and --text")
    res = {"agree": agree, "bench": bench, "ppl": perplexity}[a.what](a)
    text = {"bench": bench_table, "ppl": ppl_table}[a.what](res) if a.what != "agree" else None
    if text:
        print(text)
    now = datetime.datetime.now(datetime.timezone.utc)
    doc = {"date": now.isoformat(timespec="seconds"), "git_commit": cpu_bench._sh(["git", "-C", ROOT, "rev-parse",
                                                                                   "HEAD"]),
           "command": " ".join([os.path.relpath(sys.executable), *sys.argv]), "machine": cpu_bench.machine(),
           "llama_cpp_source": os.path.relpath(sdist_dir(), ROOT), "threads": a.threads, "nice": a.nice,
           "elapsed_s": round(time.time() - t0, 1), "results": res, "table": text}
    out = a.out or os.path.join(ROOT, "benchmarks", "results", f"llamacpp_compare_{a.what}_{now:%Y-%m-%d}.json")
    with open(out, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
