"""Structured outputs in the engine (offline, through SamplingParams): with random weights every
constrained output must still match its constraint (validated with jsonschema, re, the choices), over
many seeds, mixed with free requests, with n > 1, chunked prefill, prefix caching, overlapped steps,
the decode graphs' in-graph argmax (their CPU stand-in) and tensor parallelism."""

from __future__ import annotations

import json
import re

import pytest
import torch

from param2moe import LLM, SamplingParams
from param2moe.structured import StructuredOutputError, StructuredOutputsParams
from param2moe.structured.bitmask import apply_token_bitmask, unpack_and_fill
from param2moe.writer import preset_config, write_checkpoint

xgr = pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "enum": ["ann", "bob", "chitra"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.(com|in)$"},
        "address": {"type": "object", "additionalProperties": False, "required": ["city", "pin"],
                    "properties": {"city": {"type": "string", "enum": ["Delhi", "Pune"]},
                                   "pin": {"type": "integer", "minimum": 100000, "maximum": 999999}}},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["x", "y"]}, "maxItems": 3},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "email", "address", "tags", "ok"],
    "additionalProperties": False,
}
COMPACT = StructuredOutputsParams(json=PERSON, disable_any_whitespace=True)
EMAIL = r"[a-z]{2,6}@[a-z]{2,5}\.(com|org|in)"
GRAMMAR = 'root ::= "(" expr ")"\nexpr ::= num | num ("+" | "*") num\nnum ::= [1-9] [0-9]?'
LARK = 'start: "go " DIR (", " DIR)?\nDIR: "north" | "south" | "east" | "west"'


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("structured")
    write_checkpoint(str(path), preset_config("bundled", {"torch_dtype": "float32"}), seed=7)
    return str(path)


@pytest.fixture(scope="module")
def llm(checkpoint):
    with LLM(checkpoint, kv_cache_memory=1 << 24, max_num_seqs=64) as llm:
        yield llm


def constrained(so, seed, **kw) -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=seed, max_tokens=kw.pop("max_tokens", 300), structured_outputs=so, **kw)


def assert_person(text: str) -> None:
    jsonschema.validate(json.loads(text), PERSON)


# ------------------------------------------------------------------------------------------ parts
def test_params_name_what_is_wrong():
    with pytest.raises(StructuredOutputError, match=r"exactly one of .* \(got regex, choice\)"):
        StructuredOutputsParams(regex="a", choice=["b"])
    with pytest.raises(StructuredOutputError, match=r"exactly one .* \(got none\)"):
        StructuredOutputsParams()
    with pytest.raises(StructuredOutputError, match="structured_outputs.json: not valid JSON"):
        StructuredOutputsParams(json="{nope")
    with pytest.raises(StructuredOutputError, match="structured_outputs.choice: expected a non-empty list"):
        StructuredOutputsParams(choice=[])
    with pytest.raises(ValueError, match="structured_outputs"):
        SamplingParams(structured_outputs="json")
    as_dict = SamplingParams(structured_outputs={"regex": "a+"}).structured_outputs
    assert as_dict.kind == "regex" and as_dict.key() == StructuredOutputsParams(regex="a+").key()
    assert StructuredOutputsParams(json=json.dumps(PERSON)).key() == StructuredOutputsParams(json=PERSON).key()


def test_bitmask_applies_bit_by_bit():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 70, generator=g)
    allowed = torch.rand(3, 70, generator=g) < 0.3
    words = torch.zeros(3, 3, dtype=torch.int64)
    for r, t in allowed.nonzero().tolist():
        words[r, t // 32] |= 1 << (t % 32)
    bitmask = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)  # bit 31: the sign bit
    for apply in (apply_token_bitmask, unpack_and_fill):  # on a CPU, and as on a GPU
        out = logits.clone()
        apply(out, bitmask)
        assert torch.equal(out[allowed], logits[allowed]) and bool((out[~allowed] == float("-inf")).all())


def test_sampler_masks_inference_tensor_logits(monkeypatch):
    """The step's logits are inference tensors (ModelRunner.execute runs in inference mode; a CUDA graph's
    outputs were made during capture); the sampler, called outside inference mode, must still mask them in
    place, on the GPU's path (unpack_and_fill) too."""
    from param2moe.engine import sampler as sampler_module
    from param2moe.engine.sequence import Request, Sequence

    base, bitmask = torch.randn(2, 40), torch.tensor([[1, 0], [0, 1]], dtype=torch.int32)  # token 0, token 32
    seqs = [Sequence(i, Request(str(i), None, [5, 6], SamplingParams(temperature=0)), 0, None) for i in range(2)]
    for path in (apply_token_bitmask, unpack_and_fill):
        monkeypatch.setattr(sampler_module, "apply_token_bitmask", path)
        with torch.inference_mode():
            logits = base.clone()
        got = sampler_module.Sampler([0]).sample(logits, seqs, bitmask=bitmask).resolve().token_ids
        assert got == [0, 32]
        assert logits[0, 0] == base[0, 0] and logits[1, 32] == base[1, 32]
        assert bool((logits[0, 1:] == float("-inf")).all()) and bool((logits[1, :32] == float("-inf")).all())


def test_vocabulary_bytes(checkpoint):
    from param2moe.structured.vocab import MARKUP_BYTES, markup_ids, token_bytes
    from param2moe.tokenizer import Tokenizer

    tok = Tokenizer(checkpoint)
    vocab = token_bytes(tok, 1024)
    assert len(vocab) == 1024 and vocab[3] == b"" and vocab[1000] == b""  # EOS (special); past the tokenizer
    markup = markup_ids(tok)
    assert {"<think>", "</think>", "<tool_call>", "</tool_call>"} <= markup.keys()
    assert all(vocab[i] == MARKUP_BYTES for i in markup.values())
    text = "Hello, JSON: {\"a\": [1, 2]} नमस्ते\n"
    ids = tok.encode(text, add_special_tokens=False)
    assert b"".join(vocab[i] for i in ids).decode() == text


def test_length_bounded_strings_stay_valid_json(llm):
    # xgrammar's own maxLength rule lets raw control characters into strings (mlc-ai/xgrammar#800); the
    # compiler writes such strings as patterns. Lengths are not checked here: a random model may write
    # bytes that are not UTF-8 (xgrammar allows overlong forms), which decode to several U+FFFD.
    from param2moe.structured.compiler import bounded_strings_as_patterns

    schema = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 6},
                                               "t": {"type": "array", "maxItems": 2,
                                                     "items": {"type": "string", "minLength": 2, "maxLength": 4}}},
              "required": ["s", "t"]}
    rewritten = bounded_strings_as_patterns(schema)
    assert rewritten["properties"]["s"] == {"type": "string", "pattern": "^[\\s\\S]{0,6}$"}
    assert rewritten["properties"]["t"]["items"] == {"type": "string", "pattern": "^[\\s\\S]{2,4}$"}
    so = StructuredOutputsParams(json=schema, disable_any_whitespace=True)
    outs = llm.generate(["Write:"] * 16, [constrained(so, s, max_tokens=400) for s in range(16)], use_tqdm=False)
    for o in outs:
        assert o.outputs[0].finish_reason == "stop"
        assert isinstance(json.loads(o.outputs[0].text)["s"], str)  # strict: no raw control characters


def test_invalid_constraints_are_named(llm):
    engine = llm.llm_engine
    cases = [(dict(regex="a(b"), "structured_outputs.regex: .*parenthesis"),
             (dict(json={"type": "object", "properties": 3}), "structured_outputs.json: properties must be"),
             (dict(grammar="root ::= foo"), 'structured_outputs.grammar: .*Rule "foo" is not defined'),
             (dict(grammar="start: foo"), "structured_outputs.grammar: "),
             (dict(structural_tag={"type": "structural_tag", "format": {"type": "nope"}}),
              "structured_outputs.structural_tag: ")]
    for fields, message in cases:
        with pytest.raises(StructuredOutputError, match=message):
            engine.add_request("bad", [5, 6, 7], SamplingParams(structured_outputs=StructuredOutputsParams(**fields)))
    assert not engine.has_unfinished_requests()


def test_slow_grammar_fails_alone(checkpoint):
    props = {f"p{i}": {"type": "object", "properties": {f"q{j}": {"type": ["string", "integer", "array"],
                                                                  "items": {"type": "number"}} for j in range(10)}}
             for i in range(12)}
    slow = StructuredOutputsParams(json={"type": "object", "properties": props})
    with LLM(checkpoint, kv_cache_memory=1 << 24, grammar_compile_timeout=0.001) as llm:
        with pytest.raises(StructuredOutputError, match="structured_outputs.json: the grammar did not compile within"):
            llm.generate(["x"], SamplingParams(structured_outputs=slow), use_tqdm=False)
        out = llm.generate(["x"], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)[0].outputs[0]
        assert len(out.token_ids) == 4


def test_a_grammar_done_before_its_callback_does_not_deadlock(llm):
    """A compile that finishes before `compile` registers its clean-up (xgrammar's cache answers at once) runs the
    callback in the calling thread: it must not wait for the lock `compile` holds (it once did, and a request
    hung the engine). Made certain here: the pool hands back futures already done."""
    import threading
    from concurrent.futures import Future

    compiler = llm.llm_engine.structured.compiler

    def done_at_once(fn, *args):
        f = Future()
        f.set_result(fn(*args))
        return f

    real_submit = compiler._pool.submit
    compiler._pool.submit = done_at_once
    result = []
    try:
        worker = threading.Thread(target=lambda: result.append(compiler.compile(StructuredOutputsParams(regex="a+b"))),
                                  daemon=True)
        worker.start()
        worker.join(timeout=30)
    finally:
        compiler._pool.submit = real_submit
    assert not worker.is_alive(), "compile() deadlocked on its own lock"
    assert result and result[0] is not None and not compiler._inflight


# ------------------------------------------------------------------------------------------ outputs
def test_json_schema_outputs_are_valid(llm):
    outs = llm.generate(["Give me a person:"] * 24, [constrained(COMPACT, s) for s in range(24)], use_tqdm=False)
    texts = [o.outputs[0].text for o in outs]
    assert all(o.outputs[0].finish_reason == "stop" for o in outs), texts
    for text in texts:
        assert_person(text)
    assert len(set(texts)) > 12  # sampled, not one answer


def test_json_with_any_whitespace_is_valid(llm):
    schema = {"type": "object", "properties": {"k": {"type": "string", "enum": ["a", "b"]},
                                               "v": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["k", "v"]}
    so = StructuredOutputsParams(json=schema)
    # at most 32 whitespace characters in each of the 8 gaps (JSON_MAX_WHITESPACE): 300 tokens always suffice
    outs = llm.generate(["{"] * 4, [constrained(so, s, max_tokens=300) for s in range(4)], use_tqdm=False)
    for o in outs:
        assert o.outputs[0].finish_reason == "stop"
        jsonschema.validate(json.loads(o.outputs[0].text), schema)
    # any object: free keys and values, which a random model may not close within max_tokens
    any_object = StructuredOutputsParams(json_object=True, disable_any_whitespace=True)
    objs = llm.generate(["{"] * 4, [constrained(any_object, s, max_tokens=120) for s in range(4)], use_tqdm=False)
    assert any(o.outputs[0].finish_reason == "stop" for o in objs)
    for o in objs:
        if o.outputs[0].finish_reason == "stop":
            assert isinstance(json.loads(o.outputs[0].text), dict)
        assert o.outputs[0].text.startswith("{")


def test_regex_choice_and_grammars(llm):
    kinds = [(StructuredOutputsParams(regex=EMAIL), lambda t: re.fullmatch(EMAIL, t)),
             (StructuredOutputsParams(choice=["yes", "no", "not sure", 'say "hi"']),
              lambda t: t in ("yes", "no", "not sure", 'say "hi"')),
             (StructuredOutputsParams(grammar=GRAMMAR),
              lambda t: re.fullmatch(r"\([1-9][0-9]?([+*][1-9][0-9]?)?\)", t)),
             (StructuredOutputsParams(grammar=LARK), lambda t: re.fullmatch(r"go (north|south|east|west)"
                                                                             r"(, (north|south|east|west))?", t))]
    params = [constrained(so, seed) for so, _ in kinds for seed in range(8)]
    outs = llm.generate(["Answer:"] * len(params), params, use_tqdm=False)
    for k, (_, check) in enumerate(kinds):
        texts = [o.outputs[0].text for o in outs[8 * k:8 * (k + 1)]]
        assert all(o.outputs[0].finish_reason == "stop" for o in outs[8 * k:8 * (k + 1)]), texts
        assert all(check(t) for t in texts), texts


def test_mixed_batch_leaves_free_requests_alone(llm):
    free = [SamplingParams(temperature=1.0, seed=100 + s, max_tokens=24, ignore_eos=True) for s in range(6)]
    prompts = [f"Story {s}:" for s in range(6)]
    alone = [o.outputs[0].token_ids for o in llm.generate(prompts, free, use_tqdm=False)]
    mixed_params = [p for pair in zip(free, [constrained(COMPACT, s) for s in range(6)]) for p in pair]
    mixed = llm.generate([p for p in prompts for _ in range(2)], mixed_params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in mixed[0::2]] == alone
    for o in mixed[1::2]:
        assert_person(o.outputs[0].text)


def test_n_stop_strings_logprobs_and_eos(llm):
    eos = llm.llm_engine.eos_token_ids
    outs = llm.generate(["Person:"] * 2, constrained(COMPACT, 5, n=4, logprobs=2), use_tqdm=False)
    for o in outs:
        assert len({c.text for c in o.outputs}) > 1  # each choice its own matcher and draw
        for c in o.outputs:
            assert_person(c.text)
            assert c.finish_reason == "stop"
            assert c.token_ids[-1] in eos and all(c.token_ids[i] in lp for i, lp in enumerate(c.logprobs))
    stopped = llm.generate(["x"], constrained(COMPACT, 1, stop=['"age"']), use_tqdm=False)[0].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == '"age"' and stopped.text.startswith('{"name":')
    # min_tokens and ignore_eos do not keep a finished grammar going: the output ends where the grammar does
    for extra in (dict(min_tokens=50), dict(ignore_eos=True)):
        c = llm.generate(["x"], constrained(StructuredOutputsParams(choice=["yes", "no"]), 3, **extra),
                         use_tqdm=False)[0].outputs[0]
        assert c.text in ("yes", "no") and c.finish_reason == "stop"


def test_chunked_prefill_prefix_cache_and_overlap(checkpoint):
    prompt = "A long prompt that arrives in chunks of a few tokens each, " * 3
    params = [constrained(COMPACT, s) for s in range(6)] + [constrained(StructuredOutputsParams(regex=EMAIL), 9)]
    results = []
    for overlap in (False, True):
        with LLM(checkpoint, kv_cache_memory=1 << 24, max_num_seqs=8, max_num_batched_tokens=16,
                 async_scheduling=overlap) as llm:
            assert llm.llm_engine.overlap == overlap
            first = llm.generate([prompt] * 7, params, use_tqdm=False)
            again = llm.generate([prompt] * 7, params, use_tqdm=False)  # prompt blocks from the prefix cache
            assert all(o.num_cached_tokens > 0 for o in again)
            results.append([o.outputs[0].token_ids for o in first + again])
            for o in first[:6]:
                assert_person(o.outputs[0].text)
            assert re.fullmatch(EMAIL, first[6].outputs[0].text)
    assert results[0] == results[1]  # overlapped steps read the tokens before they fill the masks


def test_decode_graphs_argmax_is_not_taken_unmasked(checkpoint, monkeypatch):
    from test_graph_runner_cpu import _with_graphs

    greedy = [SamplingParams(temperature=0, max_tokens=200, structured_outputs=so)
              for so in (COMPACT, StructuredOutputsParams(regex=EMAIL), StructuredOutputsParams(grammar=GRAMMAR))]
    free = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = {}
    for graphs in (False, True):
        with LLM(checkpoint, kv_cache_memory=1 << 22, max_model_len=256, max_num_seqs=8,
                 async_scheduling=graphs) as llm:
            replays = _with_graphs(llm, 64, monkeypatch) if graphs else None
            outs[graphs] = [o.outputs[0] for o in llm.generate(["a", "b", "c", "d"], [*greedy, free], use_tqdm=False)]
            assert not graphs or replays["decode"] > 0
    assert [c.token_ids for c in outs[True]] == [c.token_ids for c in outs[False]]
    assert_person(outs[True][0].text)
    assert re.fullmatch(EMAIL, outs[True][1].text)


def test_tensor_parallel_masks_on_the_driver(checkpoint, llm):
    params = [SamplingParams(temperature=0, max_tokens=200, structured_outputs=so)
              for so in (COMPACT, StructuredOutputsParams(regex=EMAIL))]
    reference = [o.outputs[0] for o in llm.generate(["p", "q"], params, use_tqdm=False)]
    with LLM(checkpoint, kv_cache_memory=1 << 24, tensor_parallel_size=2, async_scheduling=True) as tp:
        outs = [o.outputs[0] for o in tp.generate(["p", "q"], params, use_tqdm=False)]
    assert [c.token_ids for c in outs] == [c.token_ids for c in reference]
    assert_person(outs[0].text)


def test_a_model_that_follows_the_format_passes_unchanged(tmp_path):
    # A scripted model (tests/scripted_checkpoint.py) that thinks, then calls a tool in Param2's format: the
    # tool-call grammar, with the optional reasoning in front, lets its greedy tokens through one for one.
    from scripted_checkpoint import write_scripted_checkpoint

    from param2moe.structured.formats import reasoning_mode, tool_calls_format, with_reasoning
    from param2moe.structured.vocab import markup_ids

    call = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    chain = ["<think>", "I should look up", " the weather.", "</think>", "<tool_call>", call, "</tool_call>",
             "<<|EOS|>>"]
    write_scripted_checkpoint(str(tmp_path), {"tool": chain}, {"tool": "\n"})
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    with LLM(str(tmp_path), kv_cache_memory=1 << 22) as llm:
        tok = llm.get_tokenizer()
        prompt = tok.apply_chat_template([{"role": "user", "content": "Weather in Paris?"}], tools=tools)
        markup = markup_ids(tok)
        so = with_reasoning(tool_calls_format(tools, False, markup), reasoning_mode(prompt), markup)
        assert reasoning_mode(prompt) == "auto"
        free, forced = (llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40, structured_outputs=s),
                                     use_tqdm=False)[0].outputs[0] for s in (None, so))
    assert forced.token_ids == free.token_ids and forced.finish_reason == "stop"
    assert forced.text == "".join(chain[:-1])
