"""Structured outputs: decode step time at batch 64 with every request constrained by a nested JSON schema,
against the same requests unconstrained, in one process (the target: at most 10% slower on an H100).

    python benchmarks/structured_bench.py                       # CUDA: Param2-17B shapes, dummy weights
    python benchmarks/structured_bench.py --preset small        # CPU: a small model of the same layout

The model folder is written in a temporary directory: config.json of the preset (weights: random, with the
routing simulation of SPEC 7 for dummy weights) and a byte-level BPE tokenizer of the model's full vocabulary
(for 128,008 ids a synthetic one: words, numbers, punctuation and whitespace runs, as a trained BPE has),
so that the grammar masks cover as many tokens as Param2's. Each request: 128 prompt tokens, temperature 1,
seeded, 256 output tokens (the free ones ignore EOS; the schema's strings and arrays are unbounded, so the
constrained ones rarely end sooner). A step's time is the wall time of `LLMEngine.step()` while all 64
sequences decode (the first steps, prefills, are left out; so are steps after any request has finished).
The runs alternate free/json twice and the report takes each mode's better median.

On the GPU machine (no network, no xgrammar): carry its wheels and run benchmarks/structured_gpu.sh, which
puts them on the path first (see there).

Correctness in the same run: 64 requests constrained by a bounded schema (no whitespace) run to their end,
and every output must parse as JSON and match the schema; no constrained token may be refused.
Prints a table; writes JSON to $OUT/structured_bench.json (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

ORDER = {  # nested: objects in arrays in objects; strings, numbers, enums, booleans
    "type": "object", "required": ["customer", "items", "shipping", "notes"],
    "properties": {
        "customer": {"type": "object", "required": ["name", "email", "address"], "properties": {
            "name": {"type": "string"}, "email": {"type": "string"},
            "address": {"type": "object", "required": ["street", "city", "zip"], "properties": {
                "street": {"type": "string"}, "city": {"type": "string"}, "zip": {"type": "string"}}}}},
        "items": {"type": "array", "items": {"type": "object", "required": ["sku", "qty", "price"], "properties": {
            "sku": {"type": "string"}, "qty": {"type": "integer"}, "price": {"type": "number"},
            "tags": {"type": "array", "items": {"type": "string"}}}}},
        "shipping": {"type": "string", "enum": ["standard", "express", "pickup"]},
        "notes": {"type": "string"}}}
BOUNDED = {  # for the correctness pass: every output ends
    "type": "object", "additionalProperties": False, "required": ["id", "status", "lines"],
    "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 9999},
                   "status": {"type": "string", "enum": ["open", "paid", "shipped"]},
                   "lines": {"type": "array", "maxItems": 3, "items": {
                       "type": "object", "additionalProperties": False, "required": ["qty", "gift"],
                       "properties": {"qty": {"type": "integer", "minimum": 1, "maximum": 99},
                                      "gift": {"type": "boolean"}}}}}}


def synthetic_tokenizer(vocab_size: int, out_dir: str) -> None:
    """tokenizer.json of exactly vocab_size ids: Param2's special tokens at 0..24 (as the writer's), the 256
    byte pieces, then generated pieces in GPT-2's byte alphabet (no merges: the bench feeds token ids)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from param2moe.writer import SPECIAL_TOKENS, TEXT_MARKUP

    rng = random.Random(0)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    pieces = list(SPECIAL_TOKENS) + sorted(alphabet)
    seen = set(pieces)
    onsets = ["", *"bcdfghjklmnprstvwyz", "th", "ch", "sh", "st", "pr", "tr", "br", "gr", "pl", "cl", "sp"]
    vowels = [*"aeiou", "ai", "ea", "ou", "io", "ee", "oo"]
    codas = ["", *"nrstlmdkx", "nd", "st", "ng", "rs", "ts", "ll"]
    punct = ['":', '",', '{"', '"}', '},', '],', '":"', '", "', '":[', '":{', '"]', '}}', ']}', '},{', ".", ",",
             "(", ")", ":", ";", "-", "_", "/", "'s", "://", "@", "#", "$", "%", "&", "*", "+", "=", "<", ">"]
    extra = ([("Ġ" * n) for n in range(2, 17)] + ["Ċ" + "Ġ" * n for n in range(0, 17)] + ["ĊĊ", "ĉ", "ĉĉ", "ĊĉĠ"]
             + [p.replace(" ", "Ġ") for p in punct] + ["Ġ" + p.replace(" ", "Ġ") for p in punct]
             + [str(n) for n in range(1000)] + ["Ġ" + str(n) for n in range(1000)])
    for p in extra:
        if p not in seen:
            seen.add(p)
            pieces.append(p)
    while len(pieces) < vocab_size:
        word = "".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
                       for _ in range(rng.choice((1, 1, 2, 2, 3))))
        for p in (word, "Ġ" + word, word.capitalize(), "Ġ" + word.capitalize()):
            if p not in seen and len(pieces) < vocab_size:
                seen.add(p)
                pieces.append(p)
    tok = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens([AddedToken(t, special=t not in TEXT_MARKUP, normalized=False) for t in SPECIAL_TOKENS])
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<<|BOS|>>", "eos_token": "<<|EOS|>>", "add_bos_token": False}, f)


def model_folder(preset: str, out_dir: str, vocab_size: int | None = None) -> str:
    from param2moe.writer import preset_config, write_tokenizer

    config = preset_config(preset, {"vocab_size": vocab_size} if vocab_size else None)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config.to_dict(), f)
    if config.vocab_size > 30000:  # the writer's trained tokenizer has a few hundred pieces: far too few
        synthetic_tokenizer(config.vocab_size, out_dir)
    else:
        write_tokenizer(out_dir, config.vocab_size, config.max_position_embeddings)
    return out_dir


def run_mode(engine, schema, a, first_id: int) -> dict:
    """One batch of a.batch requests to the end; the step times of its all-decode steady state."""
    from param2moe import SamplingParams
    from param2moe.structured import StructuredOutputsParams

    so = StructuredOutputsParams(json=schema) if schema else None
    rng = random.Random(first_id)
    lo, hi = 300, engine.model_config.vocab_size - 8  # past the special and byte pieces
    for i in range(a.batch):
        sp = SamplingParams(temperature=1.0, seed=first_id + i, max_tokens=a.output_len, ignore_eos=so is None,
                            structured_outputs=so)
        engine.add_request(f"r{first_id + i}", [rng.randrange(lo, hi) for _ in range(a.input_len)], sp)
    fill = {"s": 0.0, "n": 0}
    bitmask = engine.structured.bitmask

    def timed_bitmask(*args):
        t = time.perf_counter()
        out = bitmask(*args)
        if out is not None:
            fill["s"] += time.perf_counter() - t
            fill["n"] += 1
        return out

    engine.structured.bitmask = timed_bitmask
    steps, finished, reasons = [], {}, []
    try:
        while engine.has_unfinished_requests():
            decoding = (not engine.scheduler.waiting and len(engine.scheduler.running) == a.batch
                        and all(s.num_computed_tokens >= s.num_prompt_tokens for s in engine.scheduler.running))
            t = time.perf_counter()
            outs = engine.step()
            dt = time.perf_counter() - t
            if decoding and not finished:
                steps.append(dt)
            for o in outs:
                if o.finished:
                    finished[o.request_id] = o
                    reasons.append(o.outputs[0].finish_reason)
    finally:
        engine.structured.bitmask = bitmask
    steady = steps[2:]  # the first decode steps still settle (graph buffers, allocator)
    return {"steps": len(steady), "median_ms": 1e3 * statistics.median(steady),
            "mean_ms": 1e3 * statistics.mean(steady), "p90_ms": 1e3 * sorted(steady)[int(0.9 * (len(steady) - 1))],
            "fill_ms_per_step": 1e3 * fill["s"] / fill["n"] if fill["n"] else None,
            "finish_reasons": {r: reasons.count(r) for r in set(reasons)}}


def correctness(engine, a) -> dict:
    from param2moe import SamplingParams
    from param2moe.structured import StructuredOutputsParams

    so = StructuredOutputsParams(json=BOUNDED, disable_any_whitespace=True)
    for i in range(a.batch):
        engine.add_request(f"c{i}", [100 + i, 200 + i, 300 + i], SamplingParams(temperature=1.0, seed=i, max_tokens=200,
                                                                               structured_outputs=so))
    outs = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = o.outputs[0]
    try:
        import jsonschema
    except ImportError:
        jsonschema = None
    bad = []
    for rid, c in outs.items():
        try:
            value = json.loads(c.text)
            if jsonschema is not None:
                jsonschema.validate(value, BOUNDED)
            assert c.finish_reason == "stop"
        except Exception as e:  # noqa: BLE001 - every failure is reported
            bad.append((rid, c.finish_reason, c.text[:200], f"{type(e).__name__}: {e}"[:200]))
    return {"requests": len(outs), "valid": len(outs) - len(bad), "jsonschema": jsonschema is not None, "bad": bad[:5]}


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "")
    except OSError:
        name = ""
    return f"{name or platform.processor()} ({os.cpu_count()} cores)"


def main() -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default=None, help="default: param2-17b on CUDA, small on CPU")
    ap.add_argument("--vocab-size", type=int, default=None, help="instead of the preset's (e.g. 128008 on CPU)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2, help="free/json pairs")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results"))
    a = ap.parse_args()
    cuda = torch.cuda.is_available()
    a.preset = a.preset or ("param2-17b" if cuda else "small")
    from param2moe.engine import EngineConfig, LLMEngine
    from param2moe.structured import StructuredOutputsParams

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        folder = model_folder(a.preset, tmp, a.vocab_size)
        engine = LLMEngine(EngineConfig(model=folder, load_format="dummy", dtype=a.dtype, max_num_seqs=a.batch,
                                        max_model_len=a.input_len + a.output_len + 64))
        t1 = time.perf_counter()
        engine.structured.compile(StructuredOutputsParams(json=ORDER))  # xgrammar's import, vocabulary, compile
        setup = {"engine_s": t1 - t0, "grammar_first_compile_s": time.perf_counter() - t1}
        check = correctness(engine, a)
        runs: dict[str, list] = {"free": [], "json": []}
        for r in range(a.rounds):
            for mode in ("free", "json"):
                runs[mode].append(run_mode(engine, ORDER if mode == "json" else None, a, 1000 * (2 * r + 1)))
        engine.shutdown()
    best = {m: min(rs, key=lambda x: x["median_ms"]) for m, rs in runs.items()}
    ratio = best["json"]["median_ms"] / best["free"]["median_ms"]
    device = engine.config.device
    print(f"\nstructured outputs, {a.preset}, batch {a.batch}, {a.input_len} in / {a.output_len} out, "
          f"{_device_name(device)}")
    print(f"correctness: {check['valid']}/{check['requests']} bounded-schema outputs valid"
          f"{' (jsonschema)' if check['jsonschema'] else ' (json.loads; jsonschema not installed)'}")
    print("| mode | steps | median ms | mean ms | p90 ms | mask fill ms/step | finish reasons |")
    print("|---|---|---|---|---|---|---|")
    for mode, rs in runs.items():
        for r in rs:
            fill = "" if r["fill_ms_per_step"] is None else f"{r['fill_ms_per_step']:.2f}"
            print(f"| {mode} | {r['steps']} | {r['median_ms']:.2f} | {r['mean_ms']:.2f} | {r['p90_ms']:.2f} | "
                  f"{fill} | {r['finish_reasons']} |")
    print(f"json / free (best medians): {ratio:.3f}  (target <= 1.10 on an H100)")
    result = {"date": datetime.date.today().isoformat(), "machine": _device_name(device), "preset": a.preset,
              "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
              "vocab_size": engine.model_config.vocab_size, "torch_threads": torch.get_num_threads(),
              "dtype": str(engine.dtype), "batch": a.batch, "input_len": a.input_len, "output_len": a.output_len,
              "overlap": engine.overlap, "setup": setup, "correctness": check, "runs": runs, "ratio": ratio,
              "torch": torch.__version__, "xgrammar": _version("xgrammar"), "commit": _commit(),
              "load_average": os.getloadavg()}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "structured_bench.json"), "w") as f:
        json.dump(result, f, indent=1)
    return 0 if check["valid"] == check["requests"] else 1


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return ""


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        return ""


if __name__ == "__main__":
    sys.exit(main())
