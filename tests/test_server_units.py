"""The server's parts without a server: tool-call and reasoning parsers driven with text, the response
builders driven with fake engine output streams, and the request-to-SamplingParams mapping."""

from __future__ import annotations

import asyncio
import json

import pytest
from pydantic import ValidationError

from param2moe.engine.outputs import CompletionOutput, Logprob, RequestOutput
from param2moe.parsers import ReasoningParser, prompt_ends_in_reasoning, split_reasoning
from param2moe.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    RequestError,
    parse_logit_bias,
    to_sampling_fields,
)
from param2moe.server.serving import (
    ChatContext,
    CompletionContext,
    CompletionPrompt,
    TokenText,
    chat_full,
    chat_stream,
    completion_full,
    completion_stream,
)
from param2moe.server.tool_parser import ToolCallParser, extract_tool_calls, parse_tool_call

CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'


def feed_pieces(parser, pieces):
    content, calls = [], []
    for k, piece in enumerate(pieces):
        c, found = parser.feed(piece, final=k == len(pieces) - 1)
        content.append(c)
        calls.extend(found)
    return "".join(content), calls


# ------------------------------------------------------------------------------------ tool calls
def test_tool_call_whole():
    content, calls = extract_tool_calls("Let me check." + CALL)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert calls[0].id.startswith("call_") and calls[0].to_dict()["type"] == "function"


def test_tool_calls_several_and_only_whitespace_content():
    two = CALL + "\n" + CALL.replace("Paris", "Pune")
    content, calls = extract_tool_calls("\n" + two + "\n")
    assert content is None
    assert [json.loads(c.arguments)["city"] for c in calls] == ["Paris", "Pune"]
    assert calls[0].id != calls[1].id


@pytest.mark.parametrize("bad", [
    '<tool_call>{"name": "f", "arguments": {"x": 1}</tool_call>',  # unbalanced JSON
    '<tool_call>not json</tool_call>',
    '<tool_call>{"arguments": {}}</tool_call>',  # no name
    '<tool_call>["f"]</tool_call>',
    '<tool_call>{"name": "f", "arguments": 3}</tool_call>',
    '<tool_call>{"name": "f", "arguments": {"x": 1}}',  # never closed
])
def test_malformed_tool_call_stays_text(bad):
    content, calls = extract_tool_calls("before " + bad)
    assert calls == [] and content == "before " + bad
    # and streamed in small pieces too
    pieces = [("before " + bad)[i:i + 3] for i in range(0, len("before " + bad), 3)]
    content, calls = feed_pieces(ToolCallParser(), pieces)
    assert calls == [] and content == "before " + bad


def test_tool_call_arguments_as_string_and_missing():
    call = parse_tool_call('{"name": "f", "arguments": "{\\"a\\": 1}"}')
    assert call.arguments == '{"a": 1}'
    assert parse_tool_call('{"name": "f"}').arguments == "{}"
    assert parse_tool_call('{"name": "f", "arguments": "not json"}') is None


@pytest.mark.parametrize("size", [1, 2, 5, 11, 1000])
def test_tool_call_streaming_any_split(size):
    text = "Sure. <tool_call" + ">" + CALL[len("<tool_call>"):] + " Done <tool"
    pieces = [text[i:i + size] for i in range(0, len(text), size)]
    parser = ToolCallParser()
    content_deltas, calls = [], []
    for k, piece in enumerate(pieces):
        c, found = parser.feed(piece, final=k == len(pieces) - 1)
        content_deltas.append(c)
        calls.extend(found)
        assert "<tool" not in c or k == len(pieces) - 1  # no markup leaks mid-stream
    assert "".join(content_deltas) == "Sure.  Done <tool"
    assert len(calls) == 1 and calls[0].name == "get_weather"


def test_tool_call_delivered_when_closing_tag_arrives():
    p = ToolCallParser()
    assert p.feed("<tool_call>{\"name\": \"f\", ") == ("", [])
    assert p.feed("\"arguments\": {}}") == ("", [])
    content, calls = p.feed("</tool_call>")
    assert content == "" and calls[0].name == "f"


# ------------------------------------------------------------------------------------- reasoning
def test_reasoning_split_whole_and_streamed():
    text = "<think>step 1, step 2</think>The answer is 4."
    assert split_reasoning(text) == ("step 1, step 2", "The answer is 4.")
    for size in (1, 3, 7):
        p = ReasoningParser()
        pieces = [text[i:i + size] for i in range(0, len(text), size)]
        r, c = zip(*(p.feed(x, final=k == len(pieces) - 1) for k, x in enumerate(pieces)))
        assert "".join(r) == "step 1, step 2" and "".join(c) == "The answer is 4."
        assert not any("<" in x for x in r + c)


def test_reasoning_start_inside_open_think():
    prompt = "<|im_start|>assistant\n<think>\n"
    assert prompt_ends_in_reasoning(prompt)
    assert not prompt_ends_in_reasoning("<think>\n\n</think>\n\n")
    assert not prompt_ends_in_reasoning("no tags")
    assert split_reasoning("thinking...</think>answer", start_in_reasoning=True) == ("thinking...", "answer")
    assert split_reasoning("unclosed <think>runs to the end") == ("runs to the end", "unclosed ")
    assert split_reasoning("plain") == (None, "plain")


# --------------------------------------------------------------------------- builders with fake streams
def outputs_from_pieces(pieces_per_choice: list[list[str]], finish=("stop",), logprobs=False):
    """A fake engine stream: each step gives every unfinished choice its next piece (one token)."""
    n = len(pieces_per_choice)
    steps = max(len(p) for p in pieces_per_choice)
    out = []
    for s in range(steps):
        comps = []
        for i, pieces in enumerate(pieces_per_choice):
            if s >= len(pieces):
                comps.append(CompletionOutput(i, "", [], None, [] if logprobs else None,
                                              finish[i % len(finish)]))
                continue
            last = s == len(pieces) - 1
            lp = [{100 + s: Logprob(-0.5, 1, pieces[s]), 7: Logprob(-1.5, 2, "q")}] if logprobs else None
            comps.append(CompletionOutput(i, pieces[s], [100 + s], None, lp,
                                          finish[i % len(finish)] if last else None))
        done = s == steps - 1
        out.append(RequestOutput("r", None, [1, 2, 3], None, comps, done))
    assert n == len(out[0].outputs)
    return out


async def _agen(items):
    for x in items:
        await asyncio.sleep(0)
        yield x


def run(coro):
    return asyncio.run(coro)


async def _collect(agen):
    return [x async for x in agen]


def parse_sse(lines: list[str]) -> list:
    assert lines[-1] == "data: [DONE]\n\n"
    return [json.loads(x[len("data: "):]) for x in lines[:-1]]


def chat_ctx(**kw):
    base = dict(request_id="chatcmpl-1", model="m", created=0, num_prompt_tokens=3)
    base.update(kw)
    return ChatContext(**base)


REASON_TOOL = ["<th", "ink>", "Let me ", "look.", "</think>", "\n", "<tool_", "call>", '{"name": "get_weather", ',
               '"arguments": {"city": "Paris"}}', "</tool_call>"]


def test_chat_full_reasoning_and_tool_call():
    body = run(chat_full(_agen(outputs_from_pieces([REASON_TOOL])), chat_ctx(parse_tools=True)))
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    msg = choice["message"]
    assert msg["reasoning_content"] == "Let me look." and msg["content"] is None
    assert msg["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": len(REASON_TOOL),
                             "total_tokens": 3 + len(REASON_TOOL)}


def test_chat_full_without_tools_keeps_markup_as_content():
    body = run(chat_full(_agen(outputs_from_pieces([REASON_TOOL])), chat_ctx(parse_tools=False)))
    msg = body["choices"][0]["message"]
    assert body["choices"][0]["finish_reason"] == "stop"
    assert msg["content"].startswith("\n<tool_call>") and "tool_calls" not in msg  # as OpenAI: no key


def test_chat_stream_matches_whole_and_leaks_no_markup():
    chunks = parse_sse(run(_collect(chat_stream(_agen(outputs_from_pieces([REASON_TOOL])),
                                                chat_ctx(parse_tools=True, include_usage=True)))))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    content = "".join(d.get("content", "") for d in deltas)
    calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert reasoning == "Let me look." and content == ""
    assert not any("<" in d.get("content", "") + d.get("reasoning_content", "") for d in deltas)
    assert len(calls) == 1 and calls[0]["index"] == 0 and calls[0]["type"] == "function"
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    finals = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finals[-1] == "tool_calls" and finals.count("tool_calls") == 1
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == len(REASON_TOOL)


def test_chat_stream_two_calls_get_indices():
    pieces = ["Ok.", CALL, "\n", CALL.replace("Paris", "Pune")]
    chunks = parse_sse(run(_collect(chat_stream(_agen(outputs_from_pieces([pieces])), chat_ctx(parse_tools=True)))))
    calls = [tc for c in chunks for tc in c["choices"][0]["delta"].get("tool_calls", [])]
    assert [tc["index"] for tc in calls] == [0, 1]
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert content == "Ok."


def test_chat_stream_n2_and_start_in_reasoning():
    a = ["thinking", "</think>", "A"]
    b = ["hmm", "</think>", "B", "B"]
    ctx = chat_ctx(n=2, start_in_reasoning=True)
    chunks = parse_sse(run(_collect(chat_stream(_agen(outputs_from_pieces([a, b], finish=("stop", "length"))), ctx))))
    by = {0: {"r": "", "c": "", "f": []}, 1: {"r": "", "c": "", "f": []}}
    for c in chunks:
        ch = c["choices"][0]
        by[ch["index"]]["r"] += ch["delta"].get("reasoning_content", "")
        by[ch["index"]]["c"] += ch["delta"].get("content", "")
        if ch["finish_reason"]:
            by[ch["index"]]["f"].append(ch["finish_reason"])
    assert by[0] == {"r": "thinking", "c": "A", "f": ["stop"]}
    assert by[1] == {"r": "hmm", "c": "BB", "f": ["length"]}


def test_chat_logprobs_shape():
    ctx = chat_ctx(top_logprobs=1, token_text=TokenText(None))
    body = run(chat_full(_agen(outputs_from_pieces([["a", "b"]], logprobs=True)), ctx))
    lps = body["choices"][0]["logprobs"]["content"]
    assert [x["token"] for x in lps] == ["a", "b"]
    assert lps[0]["logprob"] == -0.5 and lps[0]["bytes"] == [97]
    assert lps[0]["top_logprobs"] == [{"token": "a", "logprob": -0.5, "bytes": [97]}]


def test_chat_stream_error_ends_with_done():
    async def broken():
        yield outputs_from_pieces([["a", "b"]])[0]
        raise RuntimeError("boom")

    chunks = parse_sse(run(_collect(chat_stream(broken(), chat_ctx()))))
    assert chunks[-1]["error"]["type"] == "internal_server_error"


def comp_ctx(prompts, **kw):
    return CompletionContext("cmpl-1", "m", 0, prompts, token_text=TokenText(None), **kw)


def test_completion_full_several_prompts_echo_logprobs():
    prompts = [CompletionPrompt("P0", [1, 2, 3]), CompletionPrompt("P1", [1, 2, 3])]
    streams = [_agen(outputs_from_pieces([["x", "y"]], logprobs=True)),
               _agen(outputs_from_pieces([["z"]], logprobs=True, finish=("length",)))]
    body = run(completion_full(streams, comp_ctx(prompts, echo=True, logprobs=1)))
    texts = [c["text"] for c in body["choices"]]
    assert texts == ["P0xy", "P1z"]
    assert [c["finish_reason"] for c in body["choices"]] == ["stop", "length"]
    lp = body["choices"][0]["logprobs"]
    assert lp["token_logprobs"][:3] == [None, None, None] and lp["token_logprobs"][3:] == [-0.5, -0.5]
    assert lp["top_logprobs"][3] == {"x": -0.5, "q": -1.5}
    assert lp["tokens"][3:] == ["x", "y"] and lp["text_offset"][3:] == [2, 3]
    assert body["usage"]["prompt_tokens"] == 6 and body["usage"]["completion_tokens"] == 3


def test_completion_stream_indices_and_usage():
    prompts = [CompletionPrompt("P0", [1]), CompletionPrompt("P1", [1])]
    streams = [_agen(outputs_from_pieces([["a", "b"], ["c"]])), _agen(outputs_from_pieces([["d"], ["e", "f"]]))]
    chunks = parse_sse(run(_collect(completion_stream(streams, comp_ctx(prompts, n=2, include_usage=True)))))
    text = {}
    for c in chunks[:-1]:
        ch = c["choices"][0]
        text[ch["index"]] = text.get(ch["index"], "") + ch["text"]
    assert text == {0: "ab", 1: "c", 2: "d", 3: "ef"}
    assert chunks[-1]["usage"]["completion_tokens"] == 6


# ------------------------------------------------------------------------------------ protocol
def test_sampling_fields_defaults_and_overrides():
    defaults = {"temperature": 0.7, "top_p": 0.9, "top_k": 50}
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], top_p=0.5, min_p=0.1,
                                logit_bias={"5": 10}, stop="x", seed=3)
    f = to_sampling_fields(req, defaults, 100, logprobs=None, max_tokens=7)
    assert (f["temperature"], f["top_p"], f["top_k"], f["min_p"]) == (0.7, 0.5, 50, 0.1)
    assert f["logit_bias"] == {5: 10.0} and f["stop"] == "x" and f["seed"] == 3 and f["max_tokens"] == 7
    req = CompletionRequest(prompt="x", temperature=0)
    assert to_sampling_fields(req, defaults, 100, logprobs=2, max_tokens=1)["temperature"] == 0


@pytest.mark.parametrize("bias", [{"x": 1}, {"100": 1}, {"-1": 1}, {"3": 101}])
def test_bad_logit_bias(bias):
    with pytest.raises(RequestError) as e:
        parse_logit_bias(bias, 100)
    assert e.value.param == "logit_bias"


def test_nan_and_wrong_types_rejected():
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate_json('{"prompt": "x", "temperature": NaN}')
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate_json('{"prompt": "x", "temperature": Infinity}')
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate_json('{"prompt": ["x", 1]}')
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate_json('{"messages": []}')
    assert CompletionRequest.model_validate_json('{"prompt": [[1, 2], [3]]}').prompt == [[1, 2], [3]]


def test_sse_escapes_unicode_line_breaks():
    from param2moe.server.serving import sse

    event = sse({"text": "a\x85b\u2028c\u2029d\né"})
    assert event.count("\n") == 2 and len(event[:-2].splitlines()) == 1
    assert json.loads(event[len("data: "):]) == {"text": "a\x85b\u2028c\u2029d\né"}
