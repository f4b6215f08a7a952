"""Structured outputs through `param2moe serve` and the official openai client: response_format
(json_object, json_schema), vLLM's structured_outputs extras (regex, choice, grammar), tool_choice
"required" and named, reasoning before the constrained part; whole and streamed, over several seeds,
mixed with free requests. A random-weight model writes whatever the grammar leaves it, so every
output that finishes must match its constraint; bad constraints get a 400 naming the problem."""

from __future__ import annotations

import asyncio
import json
import re

import pytest
from openai import AsyncOpenAI, BadRequestError, OpenAI
from test_server import Server

from param2moe.tokenizer import Tokenizer
from param2moe.writer import preset_config, write_checkpoint

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

ITEM = {"type": "object", "additionalProperties": False, "required": ["sku", "qty"],
        "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{2,4}$"},
                       "qty": {"type": "integer", "minimum": 1, "maximum": 50}}}
ORDER = {"type": "object", "additionalProperties": False, "required": ["id", "items", "express", "note"],
         "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99999}, "items": {"type": "array",
                        "items": ITEM, "minItems": 1, "maxItems": 3}, "express": {"type": "boolean"},
                        "note": {"type": ["string", "null"], "enum": ["fragile", "gift", None]}}}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
        "type": "object", "required": ["city", "unit"], "additionalProperties": False, "properties": {
            "city": {"type": "string", "enum": ["Delhi", "Mumbai", "Pune"]},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "required": ["a", "b"],
        "properties": {"a": {"type": "integer", "minimum": -99, "maximum": 99},
                       "b": {"type": "integer", "minimum": -99, "maximum": 99}}}}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
USER = [{"role": "user", "content": "Place an order."}]
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}
COMPACT = {"structured_outputs": {"disable_any_whitespace": True}}
EMAIL = r"[a-z]{2,6}@[a-z]{2,5}\.(com|in)"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("structured_model")
    write_checkpoint(str(path), preset_config("bundled", {"torch_dtype": "float32"}), seed=11)
    return str(path)


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    s = Server(["--model", str(model), "--served-model-name", "m", "--max-model-len", "1024",
                "--kv-cache-memory", str(32 << 20)],
               tmp_path_factory.mktemp("logs") / "structured.log")
    yield s
    s.check_clean_exit()


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def chats(client, stream=False, **kw) -> list[tuple]:
    """Per choice: (content, reasoning, tool calls as (name, arguments dict), finish_reason)."""
    kw.setdefault("messages", USER)
    kw.setdefault("max_tokens", 300)
    if not stream:
        out = []
        for r in client.chat.completions.create(model="m", **kw).choices:
            calls = [(c.function.name, json.loads(c.function.arguments)) for c in r.message.tool_calls or []]
            out.append((r.message.content, getattr(r.message, "reasoning_content", None), calls, r.finish_reason))
        return out
    n = kw.get("n", 1)
    content, reasoning, calls = ([[] for _ in range(n)] for _ in range(3))
    finish = [None] * n
    for chunk in client.chat.completions.create(model="m", stream=True, **kw):
        for ch in chunk.choices:
            i, d = ch.index, ch.delta
            content[i].append(d.content or "")
            reasoning[i].append(getattr(d, "reasoning_content", None) or "")
            calls[i] += [(c.function.name, json.loads(c.function.arguments)) for c in d.tool_calls or []]
            finish[i] = ch.finish_reason or finish[i]
    return [("".join(content[i]), "".join(reasoning[i]), calls[i], finish[i]) for i in range(n)]


def chat(client, stream=False, **kw) -> tuple:
    return chats(client, stream, **kw)[0]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_response_format_json_schema(client, stream):
    fmt = {"type": "json_schema", "json_schema": {"name": "order", "schema": ORDER, "strict": True}}
    for seed in (0, 10):
        for content, reasoning, calls, finish in chats(client, stream, response_format=fmt, seed=seed, n=4,
                                                       temperature=1.0, extra_body={**NO_THINKING, **COMPACT}):
            assert finish == "stop" and not calls and not reasoning, (content, finish)
            jsonschema.validate(json.loads(content), ORDER)
    # any whitespace (the default): at most 32 characters of it in each gap, so 700 tokens always suffice
    small = {"type": "object", "required": ["ok"], "properties": {"ok": {"type": "boolean"}}}
    content, _, _, finish = chat(client, stream, seed=1, temperature=1.0, max_tokens=700, extra_body=NO_THINKING,
                                 response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": small}})
    assert finish == "stop"
    jsonschema.validate(json.loads(content), small)


def test_response_format_json_object(client, model):
    # free keys and values: a logit bias towards '"' and '}' has a random model close them in time
    tok = Tokenizer(model)
    bias = {str(tok.token_to_id(c)): 10.0 for c in ('"', "}")}
    for content, _, _, finish in chats(client, response_format={"type": "json_object"}, seed=0, n=4,
                                       logit_bias=bias, max_tokens=200, extra_body={**NO_THINKING, **COMPACT}):
        assert finish == "stop", content
        assert isinstance(json.loads(content), dict)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_completions_regex_choice_grammar(client, stream):
    cases = [({"regex": EMAIL}, lambda t: re.fullmatch(EMAIL, t)),
             ({"choice": ["positive", "negative", "neutral"]}, lambda t: t in ("positive", "negative", "neutral")),
             ({"grammar": 'root ::= "[" num ("," num)? "]"\nnum ::= [0-9]'},
              lambda t: re.fullmatch(r"\[[0-9](,[0-9])?\]", t))]
    for extra, check in cases:
        kw = dict(model="m", prompt="Answer:", max_tokens=64, n=2, seed=3, temperature=1.0,
                  extra_body={"structured_outputs": extra})
        if not stream:
            choices = client.completions.create(**kw).choices
            texts, finishes = [c.text for c in choices], [c.finish_reason for c in choices]
        else:
            texts, finishes = ["", ""], [None, None]
            for chunk in client.completions.create(stream=True, **kw):
                for c in chunk.choices:
                    texts[c.index] += c.text
                    finishes[c.index] = c.finish_reason or finishes[c.index]
        assert finishes == ["stop", "stop"] and all(check(t) for t in texts), (extra, texts)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_tool_choice_required_and_named(client, stream):
    named = {"type": "function", "function": {"name": "add"}}
    for choice in ("required", named):
        for content, _, calls, finish in chats(client, stream, tools=TOOLS, tool_choice=choice, seed=1, n=3,
                                               parallel_tool_calls=False, temperature=1.0, extra_body=NO_THINKING):
            assert finish == "tool_calls" and len(calls) == 1 and not content, (content, calls, finish)
            name, args = calls[0]
            assert name == "add" if choice is named else name in SCHEMAS
            jsonschema.validate(args, SCHEMAS[name])
    _, _, calls, _ = chat(client, tools=TOOLS, tool_choice="required", seed=0, temperature=1.0,
                          max_tokens=150, extra_body=NO_THINKING)  # parallel calls allowed: one or more
    assert calls and all(jsonschema.validate(args, SCHEMAS[name]) is None for name, args in calls)


def test_reasoning_comes_first(client):
    # The prompt leaves <think> open (the assistant turn continued after it): reasoning runs free until
    # </think> (the logit bias makes a random model write it soon), then the constraint applies.
    think = USER + [{"role": "assistant", "content": "<think>"}]
    end_think = {"11": 6.0}  # </think> in the bundled tokenizer (SPEC 5)
    for seed in range(2):
        extra = {"continue_final_message": True, "add_generation_prompt": False, **COMPACT}
        content, reasoning, _, finish = chat(client, messages=think, seed=seed, logit_bias=end_think, max_tokens=400,
                                             response_format={"type": "json_schema",
                                                              "json_schema": {"name": "o", "schema": ORDER}},
                                             extra_body=extra)
        assert finish == "stop" and reasoning is not None, (content, reasoning)
        jsonschema.validate(json.loads(content), ORDER)
        content, reasoning, calls, finish = chat(client, messages=think, seed=seed, logit_bias=end_think,
                                                 tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                                                 extra_body={"continue_final_message": True,
                                                             "add_generation_prompt": False})
        assert finish == "tool_calls" and len(calls) == 1 and reasoning is not None and not content
        jsonschema.validate(calls[0][1], SCHEMAS[calls[0][0]])


def test_constrained_and_free_requests_together(server):
    fmt = {"type": "json_schema", "json_schema": {"name": "order", "schema": ORDER}}

    async def run():
        aclient = AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        constrained = [aclient.chat.completions.create(model="m", messages=USER, response_format=fmt, seed=s,
                                                       max_tokens=300, extra_body={**NO_THINKING, **COMPACT})
                       for s in range(8)]
        free = [aclient.completions.create(model="m", prompt=f"Story {s}", max_tokens=40, seed=s,
                                           extra_body={"ignore_eos": True}) for s in range(8)]
        return await asyncio.gather(*constrained, *free)

    results = asyncio.run(run())
    for r in results[:8]:
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), ORDER)
    assert all(r.usage.completion_tokens == 40 for r in results[8:])


def test_bad_constraints_are_400s_naming_the_problem(client):
    def fails(match, **kw):
        with pytest.raises(BadRequestError, match=match):
            client.chat.completions.create(model="m", messages=USER, max_tokens=4, **kw)

    fails("structured_outputs.regex: .*parenthesis", extra_body={"structured_outputs": {"regex": "a(b"}})
    fails("structured_outputs.grammar: .*not defined", extra_body={"structured_outputs": {"grammar": "root ::= x"}})
    fails('response_format: .*Unsupported type "nope"',
          response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}})
    fails("response_format.json_schema.schema: required", response_format={"type": "json_schema",
                                                                            "json_schema": {"name": "x"}})
    fails("tools: ", tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}],
          tool_choice="required")
    fails("response_format: cannot be combined with structured_outputs", response_format={"type": "json_object"},
          extra_body={"structured_outputs": {"regex": "a"}})
    fails("structured_outputs: unknown or unsupported field.*whitespace_pattern",
          extra_body={"structured_outputs": {"json_object": True, "whitespace_pattern": " "}})
    # the server goes on serving
    r = client.completions.create(model="m", prompt="x", max_tokens=8, extra_body={"structured_outputs":
                                                                                  {"choice": ["a", "b"]}})
    assert r.choices[0].text in ("a", "b")
