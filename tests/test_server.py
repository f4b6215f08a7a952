"""`param2moe serve` end to end: real server processes on 127.0.0.1, driven with the official openai
client (and httpx for what the client cannot send).

Two servers per module: a random checkpoint of the writer's `bundled` preset (float32, so that greedy
outputs do not depend on the batch; random weights, so that generation runs to max_tokens where the
trained default model may end its text) behind an API key, and a scripted tiny checkpoint
(tests/scripted_checkpoint.py) that writes reasoning and a tool call on cue, with tight limits (one running
sequence, one queued, small bodies). A third is started and stopped with SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time

import httpx
import openai
import pytest
from cases import ANSWER_CHAIN, ENTRIES, TOOL_CALL_CHAIN, TOOL_JSON, USER
from openai import AsyncOpenAI, OpenAI
from scripted_checkpoint import write_scripted_checkpoint
from server_harness import KEY, Server, assert_error, post

from param2moe.writer import preset_config, write_checkpoint

MAX_LEN = 512
CHAINS = {
    # after "<|im_start|>assistant\n": think, then call the tool
    "tool": ["<think>", "I should look up", " the weather.", "</think>", *TOOL_CALL_CHAIN],
    # after an assistant message "<answer>" continued: a plain answer
    "answer": ANSWER_CHAIN,
}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


@pytest.fixture(scope="module")
def main(tmp_path_factory):
    model = tmp_path_factory.mktemp("random") / "param2-small"  # the server names it by its folder
    write_checkpoint(str(model), preset_config("bundled"), seed=0)
    server = Server(["--model", str(model), "--dtype", "float32", "--api-key", KEY, "--max-model-len", str(MAX_LEN),
                     "--kv-cache-memory", str(64 << 20)], tmp_path_factory.mktemp("logs") / "main.log")
    yield server
    server.check_clean_exit()


@pytest.fixture(scope="module")
def scripted_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("scripted")
    ids = write_scripted_checkpoint(str(d), CHAINS, ENTRIES)
    return d, ids


@pytest.fixture(scope="module")
def scripted(scripted_dir, tmp_path_factory):
    d, ids = scripted_dir
    server = Server(["--model", str(d), "--served-model-name", "scripted", "--max-num-seqs", "1",
                     "--max-queued-requests", "1", "--max-request-bytes", "20000", "--kv-cache-memory", str(16 << 20)],
                    tmp_path_factory.mktemp("logs") / "scripted.log")
    server.ids = ids
    yield server
    server.check_clean_exit()


@pytest.fixture(scope="module")
def client(main):
    return OpenAI(base_url=main.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def sclient(scripted):
    return OpenAI(base_url=scripted.url + "/v1", api_key="unused", max_retries=0, timeout=120)


# =============================================================================== plain endpoints
def test_models_health_version(main, client):
    assert httpx.get(main.url + "/health").status_code == 200
    assert httpx.get(main.url + "/version").json()["version"]
    models = client.models.list().data
    assert [m.id for m in models] == ["param2-small"]  # no --served-model-name: the folder's name
    assert models[0].model_extra["max_model_len"] == MAX_LEN


def test_tokenize_detokenize(main):
    r = post(main, "/tokenize", {"model": "param2-small", "prompt": "Hello world", "return_token_strs": True}).json()
    assert r["count"] == len(r["tokens"]) == len(r["token_strs"]) and r["max_model_len"] == MAX_LEN
    assert post(main, "/detokenize", {"tokens": r["tokens"]}).json() == {"prompt": "Hello world"}
    chat = post(main, "/tokenize", {"messages": USER}).json()
    text = post(main, "/detokenize", {"tokens": chat["tokens"]}).json()["prompt"]
    assert text.endswith("<|im_start|>assistant\n") and "What is the weather" in text
    assert_error(post(main, "/detokenize", {"tokens": [10 ** 9]}), 400, "outside the vocabulary")


# =============================================================================== completions
def test_completion(client):
    r = client.completions.create(model="param2-small", prompt="The river flows to", max_tokens=8, temperature=0)
    c = r.choices[0]
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert c.finish_reason == "length" and c.text
    assert r.usage.completion_tokens == 8 and r.usage.total_tokens == r.usage.prompt_tokens + 8


def test_completion_prompt_forms_and_echo(main, client):
    text = "The river flows to"
    ids = post(main, "/tokenize", {"prompt": text}).json()["tokens"]
    want = client.completions.create(model="param2-small", prompt=text, max_tokens=6, temperature=0).choices[0].text
    by_ids = client.completions.create(model="param2-small", prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == want
    many = client.completions.create(model="param2-small", prompt=[text, "Hello"], max_tokens=6, temperature=0)
    assert [c.index for c in many.choices] == [0, 1] and many.choices[0].text == want
    many_ids = client.completions.create(model="param2-small", prompt=[ids, ids[:2]], max_tokens=6, temperature=0)
    assert many_ids.choices[0].text == want and len(many_ids.choices) == 2
    echo = client.completions.create(model="param2-small", prompt=text, max_tokens=6, temperature=0, echo=True)
    assert echo.choices[0].text == text + want


def test_completion_stream(client):
    want = client.completions.create(model="param2-small", prompt="Once upon a time", max_tokens=10, temperature=0)
    chunks = list(client.completions.create(model="param2-small", prompt="Once upon a time", max_tokens=10,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == want.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_completion_logprobs(client):
    r = client.completions.create(model="param2-small", prompt="Hello", max_tokens=5, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 4 and chosen <= 0  # tokens that decode alike share a key
        assert chosen == pytest.approx(max(top.values()), abs=1e-5)  # greedy: the best one
    echo = client.completions.create(model="param2-small", prompt="Hello there", max_tokens=2, temperature=0,
                                     logprobs=1, echo=True)
    lp = echo.choices[0].logprobs
    assert lp.token_logprobs[0] is None and all(x is not None for x in lp.token_logprobs[1:])
    assert echo.choices[0].text.startswith("Hello there")
    # vLLM's prompt_logprobs: per prompt token, {id: {logprob, rank, decoded_token}}
    r = client.completions.create(model="param2-small", prompt="Hello there", max_tokens=1,
                                  extra_body={"prompt_logprobs": 2})
    plp = r.choices[0].model_extra["prompt_logprobs"]
    assert len(plp) == r.usage.prompt_tokens and plp[0] is None
    assert all(2 <= len(e) <= 3 and all(v["logprob"] <= 0 for v in e.values()) for e in plp[1:])


# =============================================================================== chat
def test_chat(client):
    r = client.chat.completions.create(model="param2-small", messages=USER, max_tokens=8, temperature=0)
    c = r.choices[0]
    assert r.object == "chat.completion" and c.message.role == "assistant" and c.finish_reason == "length"
    assert r.usage.completion_tokens == 8
    stream = list(client.chat.completions.create(model="param2-small", messages=USER, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert stream[0].choices[0].delta.role == "assistant"
    deltas = [s.choices[0].delta for s in stream if s.choices]
    streamed = "".join((d.content or "") + (getattr(d, "reasoning_content", None) or "") for d in deltas)
    whole = (c.message.content or "") + (getattr(c.message, "reasoning_content", None) or "")
    assert streamed == whole
    assert stream[-1].usage.completion_tokens == 8


def test_chat_content_parts_and_system(client):
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}]
    r = client.chat.completions.create(model="param2-small", messages=msgs, max_completion_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3


def test_n_greater_than_one(client):
    r = client.chat.completions.create(model="param2-small", messages=USER, max_tokens=6, n=3, temperature=1.0,
                                       seed=1)
    assert [c.index for c in r.choices] == [0, 1, 2] and r.usage.completion_tokens == 18
    again = client.chat.completions.create(model="param2-small", messages=USER, max_tokens=6, n=3, temperature=1.0,
                                           seed=1)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]  # seeded
    chunks = list(client.completions.create(model="param2-small", prompt="Hi", max_tokens=4, n=2, stream=True,
                                            temperature=1.0))
    finished = sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason)
    assert finished == [0, 1]


def test_chat_logprobs(client):
    r = client.chat.completions.create(model="param2-small", messages=USER, max_tokens=4, temperature=0,
                                       logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    for t in content:
        assert len(t.top_logprobs) == 2 and t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-5)
        assert isinstance(t.bytes, list)
    r = client.chat.completions.create(model="param2-small", messages=USER, max_tokens=1,
                                       extra_body={"prompt_logprobs": 0})
    assert len(r.model_extra["prompt_logprobs"]) == r.usage.prompt_tokens


def test_sampling_options(main, client):
    base = dict(model="param2-small", prompt="The engine keeps", temperature=0)
    greedy = client.completions.create(**base, max_tokens=12).choices[0]
    # stop string: cut before it (or kept with include_stop_str_in_output)
    stop = greedy.text[3:6]
    if stop.strip():
        r = client.completions.create(**base, max_tokens=12, stop=[stop]).choices[0]
        assert r.finish_reason == "stop" and r.text == greedy.text[: greedy.text.find(stop)]
        assert r.model_extra["stop_reason"] == stop
        r = client.completions.create(**base, max_tokens=12, stop=stop,
                                      extra_body={"include_stop_str_in_output": True}).choices[0]
        assert r.text.endswith(stop)
    # logit_bias forces a token; ignore_eos / min_tokens keep going
    tid = post(main, "/tokenize", {"prompt": " river"}).json()["tokens"][-1]
    piece = post(main, "/detokenize", {"tokens": [tid]}).json()["prompt"]
    r = client.completions.create(**base, max_tokens=4, logit_bias={str(tid): 100}, logprobs=0)
    assert r.choices[0].text == piece * 4
    r = client.completions.create(**base, max_tokens=5, extra_body={"ignore_eos": True, "min_tokens": 5,
                                                                    "top_k": 5, "min_p": 0.05,
                                                                    "repetition_penalty": 1.2})
    assert r.usage.completion_tokens == 5
    # sampled with a seed: reproducible; penalties accepted
    kw = dict(model="param2-small", prompt="Hi", max_tokens=8, temperature=0.9, top_p=0.95, seed=42,
              presence_penalty=0.5, frequency_penalty=0.5)
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


# =============================================================================== concurrency
def test_64_concurrent_streams_match_sequential_greedy(main, client):
    # one shared head (prefix-cache hits), then a different question each
    head = "The engine keeps keys and values in a paged cache and schedules requests in batches. "
    prompts = [head + f"Question {k}: what is {k} times {k + 3}? Item {k}" for k in range(64)]
    want = [client.completions.create(model="param2-small", prompt=p, max_tokens=12, temperature=0).choices[0].text
            for p in prompts]  # one at a time
    aclient = AsyncOpenAI(base_url=main.url + "/v1", api_key=KEY, max_retries=0, timeout=300)

    async def one(k: int) -> str:
        stream = await aclient.completions.create(model="param2-small", prompt=prompts[k], max_tokens=12,
                                                  temperature=0, stream=True)
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def all_of_them():
        try:
            return await asyncio.gather(*(one(k) for k in range(64)))
        finally:
            await aclient.close()

    got = asyncio.run(all_of_them())
    assert got == want
    assert main.metric("param2moe:prefix_cache_hit_rate") > 0
    assert main.metric("param2moe:num_requests_running") == 0


# =============================================================================== scripted: tools, reasoning
def test_tool_call_round_trip(scripted, sclient):
    r = sclient.chat.completions.create(model="scripted", messages=USER, tools=TOOLS)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls"
    assert c.message.content is None
    assert c.message.model_extra["reasoning_content"] == "I should look up the weather."
    call = c.message.tool_calls[0]
    assert call.type == "function" and call.id and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    # send the call back with the tool's answer: the template renders both
    msgs = [*USER, c.message.model_dump(exclude_none=True, exclude={"reasoning_content"}),
            {"role": "tool", "tool_call_id": call.id, "content": "sunny, 24 C"}]
    r2 = sclient.chat.completions.create(model="scripted", messages=msgs, tools=TOOLS)
    assert r2.choices[0].finish_reason == "tool_calls"
    ids = post(scripted, "/tokenize", {"messages": msgs, "tools": TOOLS}, key=None).json()["tokens"]
    text = post(scripted, "/detokenize", {"tokens": ids}, key=None).json()["prompt"]
    assert "<tool_response>sunny, 24 C</tool_response>" in text
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in text
    assert '"name": "get_weather", "description"' in text  # the tools in the system prompt


def test_tool_call_streaming(sclient):
    chunks = list(sclient.chat.completions.create(model="scripted", messages=USER, tools=TOOLS, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    content = "".join(d.content or "" for d in deltas)
    reasoning = "".join(d.model_extra.get("reasoning_content") or "" for d in deltas)
    calls = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert content == "" and reasoning == "I should look up the weather."
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_tool_choice_none_and_named(scripted, sclient):
    r = sclient.chat.completions.create(model="scripted", messages=USER, tools=TOOLS, tool_choice="none")
    assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls
    assert r.choices[0].message.content == "<tool_call>" + TOOL_JSON + "</tool_call>"
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = sclient.chat.completions.create(model="scripted", messages=USER, tools=TOOLS, tool_choice=named)
    assert r.choices[0].message.tool_calls[0].function.name == "get_weather"
    bad = {"type": "function", "function": {"name": "nope"}}
    assert_error(post(scripted, "/v1/chat/completions", {"messages": USER, "tools": TOOLS, "tool_choice": bad}),
                 400, "nope", param="tool_choice")


def test_reasoning_and_answer(sclient):
    # the prompt ends inside an open <think> (an assistant turn continued): output starts in reasoning
    msgs = [*USER, {"role": "assistant", "content": "<think>"}]
    r = sclient.chat.completions.create(model="scripted", messages=msgs,
                                        extra_body={"continue_final_message": True, "add_generation_prompt": False})
    assert r.choices[0].message.model_extra["reasoning_content"] == "I should look up the weather."
    chunks = list(sclient.chat.completions.create(
        model="scripted", messages=msgs, stream=True,
        extra_body={"continue_final_message": True, "add_generation_prompt": False}))
    reasoning = "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in chunks if c.choices)
    assert reasoning == "I should look up the weather."
    # no reasoning at all: content only; the model's sampling defaults (greedy here) come from
    # its generation_config.json since the request gives no temperature
    msgs = [*USER, {"role": "assistant", "content": "<answer>"}]
    r = sclient.chat.completions.create(model="scripted", messages=msgs,
                                        extra_body={"continue_final_message": True, "add_generation_prompt": False})
    m = r.choices[0].message
    assert m.content == "The weather in Paris is sunny." and m.model_extra["reasoning_content"] is None
    assert r.choices[0].finish_reason == "stop"


# =============================================================================== bad input
def test_auth(main):
    body = {"model": "param2-small", "prompt": "x", "max_tokens": 1}
    assert_error(post(main, "/v1/completions", body, key=None), 401, "API key")
    assert_error(post(main, "/v1/completions", body, key="wrong"), 401)
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=main.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(main.url + "/health").status_code == 200  # open paths stay open
    assert httpx.get(main.url + "/metrics").status_code == 200


def test_unknown_model_404(main, client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="x", max_tokens=1)
    r = post(main, "/v1/chat/completions", {"model": "gpt-9", "messages": USER})
    err = assert_error(r, 404, "gpt-9")
    assert err["param"] == "model"
    # logged with its request id, though this server has no --enable-access-log (which adds 2xx lines)
    line = next(line for line in main.log_path.read_text().splitlines() if r.headers["x-request-id"] in line)
    assert "WARNING" in line and "404" in line and "gpt-9" in line
    assert "POST /v1/completions 200" not in main.log_path.read_text()
    assert_error(post(main, "/v1/nothing-here", {}), 404)


@pytest.mark.parametrize("body, fragments, param", [
    ('{"model": "param2-small", "prompt": "x",', ["not valid JSON"], None),
    ("[1, 2]", [], None),
    ('{"prompt": ["a", 1]}', ["prompt"], "prompt"),
    ('{"messages": "hi"}', ["messages"], None),
    ('{"prompt": "x", "temperature": NaN}', ["temperature"], "temperature"),
    ('{"prompt": "x", "max_tokens": "many"}', ["max_tokens"], "max_tokens"),
])
def test_malformed_body_400(main, body, fragments, param):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    assert_error(post(main, path, body), 400, *fragments, param=param)


@pytest.mark.parametrize("extra, fragment, param", [
    ({"temperature": -1}, "temperature", "temperature"),
    ({"top_p": 2}, "top_p", "top_p"),
    ({"top_k": -5}, "top_k", "top_k"),
    ({"min_p": 3}, "min_p", "min_p"),
    ({"n": 0}, "n", "n"),
    ({"n": 100000}, "n", "n"),
    ({"presence_penalty": 5}, "presence_penalty", "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty", "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty", "repetition_penalty"),
    ({"max_tokens": 0}, "max_tokens", "max_tokens"),
    ({"max_tokens": 4, "min_tokens": 9}, "min_tokens", "min_tokens"),
    ({"logprobs": 50}, "logprobs", "logprobs"),
    ({"logit_bias": {"abc": 1}}, "logit_bias", "logit_bias"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias", "logit_bias"),
    ({"stop": [""]}, "stop", "stop"),
    ({"stop": ["a"] * 300}, "stop", "stop"),
    ({"seed": 2 ** 70}, "seed", "seed"),
    ({"stop_token_ids": [-1]}, "stop_token_ids", "stop_token_ids"),
    ({"prompt": []}, "prompt", "prompt"),
    ({"prompt": [5, 10 ** 9]}, "vocabulary", "prompt"),
    ({"suffix": "x"}, "suffix", "suffix"),
])
def test_invalid_values_400(main, extra, fragment, param):
    body = {"model": "param2-small", "prompt": "Hello", "max_tokens": 4, **extra}
    assert_error(post(main, "/v1/completions", body), 400, fragment, param=param)


@pytest.mark.parametrize("extra, fragment", [
    ({"messages": [{"role": "user"}]}, "content"),
    ({"messages": [{"content": "x"}]}, "role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "text"),
    ({"top_logprobs": 3}, "logprobs"),
    ({"logprobs": True, "top_logprobs": 30}, "logprobs"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
])
def test_invalid_chat_400(main, extra, fragment):
    body = {"model": "param2-small", "messages": USER, "max_tokens": 2, **extra}
    assert_error(post(main, "/v1/chat/completions", body), 400, fragment)


def test_prompt_too_long_400(main, client):
    long_prompt = "river " * 600
    n = post(main, "/tokenize", {"prompt": long_prompt}).json()["count"]
    err = assert_error(post(main, "/v1/completions", {"prompt": long_prompt}), 400, str(MAX_LEN), str(n))
    assert err["code"] == "context_length_exceeded"
    short = post(main, "/tokenize", {"prompt": "Hello"}).json()["count"]
    err = assert_error(post(main, "/v1/completions", {"prompt": "Hello", "max_tokens": MAX_LEN}), 400,
                       str(MAX_LEN), f"{short} in the prompt", f"{MAX_LEN} in the completion")
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model="param2-small", messages=USER, max_tokens=MAX_LEN)
    # the rest of the context is the default max_tokens
    r = client.completions.create(model="param2-small", prompt=[1] * (MAX_LEN - 3), temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_request_too_large_413(scripted):
    r = post(scripted, "/v1/completions", {"prompt": "x" * 30000, "max_tokens": 1}, key=None)
    assert_error(r, 413, "20000")

    def chunked():  # no Content-Length: counted as it arrives
        yield b'{"prompt": "'
        for _ in range(30):
            yield b"x" * 1000
        yield b'", "max_tokens": 1}'

    r = httpx.post(scripted.url + "/v1/completions", content=chunked(), headers={"content-type": "application/json"})
    assert_error(r, 413)
    assert httpx.get(scripted.url + "/health").status_code == 200


def test_server_survives_bad_input(main, client):
    assert client.completions.create(model="param2-small", prompt="still here", max_tokens=2).usage
    m = main.metrics()
    assert not any("outcome=\"error\"" in k and v > 0 for k, v in m.items())


# =============================================================================== limits and aborts
def wait_idle(server, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = server.metrics()
        if (m['param2moe:kv_cache_usage_perc{model_name="scripted"}'] == 0
                and m['param2moe:num_requests_running{model_name="scripted"}'] == 0
                and m['param2moe:num_requests_waiting{model_name="scripted"}'] == 0):
            return
        time.sleep(0.1)
    raise AssertionError(f"blocks not freed: {server.metrics()}")


LONG = {"model": "scripted", "prompt": [5, 6, 7], "max_tokens": 1000, "ignore_eos": True, "stream": True}


def test_disconnect_frees_blocks(scripted):
    wait_idle(scripted)
    aborted = scripted.metric("param2moe:requests_total", outcome="abort")
    with httpx.stream("POST", scripted.url + "/v1/completions", json=LONG, timeout=60) as r:
        lines = r.iter_lines()
        got = []
        for line in lines:
            if line.startswith("data: "):
                got.append(line)
            if len(got) >= 3:
                break
        assert scripted.metric("param2moe:kv_cache_usage_perc") > 0
    wait_idle(scripted)  # the stream was closed mid-way: aborted, blocks back
    assert scripted.metric("param2moe:requests_total", outcome="abort") == aborted + 1
    # a non-streaming request whose client gives up is aborted too
    body = {**LONG, "stream": False}
    finished = scripted.metric("param2moe:requests_total", outcome="length")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(scripted.url + "/v1/completions", json=body, timeout=httpx.Timeout(60, read=0.3))
    wait_idle(scripted)
    assert scripted.metric("param2moe:requests_total", outcome="abort") == aborted + 2
    assert scripted.metric("param2moe:requests_total", outcome="length") == finished


def test_queue_full_503(scripted, sclient):
    wait_idle(scripted)
    with httpx.Client(timeout=60) as h:
        with h.stream("POST", scripted.url + "/v1/completions", json=LONG) as first:
            lines = first.iter_lines()
            next(line for line in lines if line.startswith("data: "))  # running
            with h.stream("POST", scripted.url + "/v1/completions", json=LONG) as second:  # waiting
                assert second.status_code == 200
                r = httpx.post(scripted.url + "/v1/completions", json={**LONG, "stream": False}, timeout=60)
                err = assert_error(r, 503, "max-queued-requests")
                assert err["code"] == "queue_full" and r.headers["retry-after"]
                with pytest.raises(openai.APIStatusError) as e:
                    sclient.completions.create(model="scripted", prompt="x", max_tokens=1)
                assert e.value.status_code == 503
    wait_idle(scripted)
    assert sclient.completions.create(model="scripted", prompt=[5], max_tokens=1).usage.completion_tokens == 1
    assert scripted.metric("param2moe:requests_total", outcome="rejected") >= 2


def test_metrics(main):
    text = httpx.get(main.url + "/metrics").text
    for name in ["param2moe:requests_total", "param2moe:prompt_tokens_total", "param2moe:generation_tokens_total",
                 "param2moe:time_to_first_token_seconds_bucket", "param2moe:inter_token_latency_seconds_bucket",
                 "param2moe:num_requests_running", "param2moe:num_requests_waiting", "param2moe:kv_cache_usage_perc",
                 "param2moe:prefix_cache_hit_rate"]:
        assert name in text, name
    m = main.metrics()
    assert m['param2moe:generation_tokens_total{model_name="param2-small"}'] > 100
    assert m['param2moe:time_to_first_token_seconds_count{model_name="param2-small"}'] > 10
    assert m['param2moe:requests_total{model_name="param2-small",outcome="length"}'] > 10


# =============================================================================== SIGTERM
def test_sigterm_drains_and_exits_0(scripted_dir, tmp_path):
    d, _ = scripted_dir
    server = Server(["--model", str(d), "--served-model-name", "scripted", "--drain-seconds", "60",
                     "--kv-cache-memory", str(16 << 20)], tmp_path / "sigterm.log")
    try:
        body = {**LONG, "max_tokens": 900, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            server.proc.send_signal(signal.SIGTERM)
            time.sleep(0.1)
            refused = httpx.post(server.url + "/v1/completions", json={**body, "stream": False}, timeout=10)
            assert refused.status_code == 503  # draining: no new work
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        usage = json.loads(rest[-2][len("data: "):])["usage"]
        assert usage["completion_tokens"] == 900  # the request in flight was allowed to finish
        assert server.proc.wait(30) == 0
    finally:
        server.stop()
    assert "Traceback" not in server.log_path.read_text()


def test_sigterm_aborts_after_drain_time(scripted_dir, tmp_path):
    d, _ = scripted_dir
    server = Server(["--model", str(d), "--served-model-name", "scripted", "--drain-seconds", "0",
                     "--kv-cache-memory", str(16 << 20)], tmp_path / "sigterm0.log")
    try:
        body = {**LONG, "max_tokens": 1000}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            server.proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]" and "shutting down" in rest[-2]
        assert server.proc.wait(30) == 0
    finally:
        server.stop()
    assert re.search(r"Traceback", server.log_path.read_text()) is None


def test_fuzzed_bodies_never_500(scripted):
    """Odd but well-formed-enough JSON in every field: always a 2xx or a 4xx in OpenAI's shape."""
    import random

    rng = random.Random(0)
    odd = [None, True, -1, 0, 2 ** 64, 1e308, -1e308, 0.5, "", "x", "<think>", [], [None], [-1], [[]], {}, {"a": 1},
           [{"role": "user"}], [{"role": "tool", "content": "x"}], {"type": "function"}, [1, "a"], "\udcff"[:0]]
    chat_fields = ["messages", "model", "n", "temperature", "top_p", "top_k", "min_p", "max_tokens", "stop", "seed",
                   "logit_bias", "logprobs", "top_logprobs", "tools", "tool_choice", "stream_options",
                   "chat_template_kwargs", "continue_final_message", "add_generation_prompt", "min_tokens",
                   "repetition_penalty", "presence_penalty", "stop_token_ids", "response_format",
                   "max_completion_tokens", "ignore_eos"]
    comp_fields = ["prompt", "echo", "logprobs", "suffix", "best_of", "max_tokens", "n", "prompt_logprobs", "stop"]
    for k in range(80):
        chat = k % 2 == 0
        body = ({"model": "scripted", "messages": USER, "max_tokens": 2} if chat
                else {"model": "scripted", "prompt": [5], "max_tokens": 2})
        for field in rng.sample(chat_fields if chat else comp_fields, 2):
            body[field] = rng.choice(odd)
        body["stream"] = rng.random() < 0.3
        r = httpx.post(scripted.url + ("/v1/chat/completions" if chat else "/v1/completions"), json=body, timeout=60)
        assert r.status_code < 500 or r.status_code == 503, (body, r.text)
        if r.status_code >= 400 and r.status_code != 503:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        elif body["stream"]:
            assert r.text.rstrip().endswith("data: [DONE]")
            assert '"error"' not in r.text, (body, r.text)
    for path, body in [("/tokenize", {"messages": [{"role": 1}]}), ("/tokenize", {"prompt": 5}),
                       ("/detokenize", {"tokens": ["a"]}), ("/tokenize", {})]:
        assert httpx.post(scripted.url + path, json=body).status_code == 400
    assert httpx.get(scripted.url + "/health").status_code == 200
