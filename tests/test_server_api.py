"""The server's edges, end to end on a scripted tiny checkpoint (tests/scripted_checkpoint.py): bad input
that once gave a 500 or was coerced silently, requests that can never be admitted, the access log, the
model endpoint and unknown routes, tokenization off the event loop, and the OpenAPI document, checked
against real responses with a bounded schemathesis run."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from cases import ANSWER_CHAIN, ENTRIES, TOOL_CALL_CHAIN, USER
from openai import OpenAI
from scripted_checkpoint import write_scripted_checkpoint
from server_harness import Server, assert_error

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
ANSWER = [*USER, {"role": "assistant", "content": "<answer>"}]
CHAINS = {"tool": TOOL_CALL_CHAIN, "answer": ANSWER_CHAIN}
MAX_NUM_SEQS, MAX_QUEUED = 2, 1


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    d = tmp_path_factory.mktemp("scripted")
    write_scripted_checkpoint(str(d), CHAINS, ENTRIES)
    server = Server(["--model", str(d), "--served-model-name", "scripted", "--max-num-seqs", str(MAX_NUM_SEQS),
                     "--max-queued-requests", str(MAX_QUEUED), "--kv-cache-memory", str(16 << 20),
                     "--enable-access-log"], tmp_path_factory.mktemp("logs") / "api.log")
    yield server
    server.check_clean_exit()


def post(server, path: str, body) -> httpx.Response:
    if isinstance(body, str):  # raw JSON text (to send what json.dumps would not)
        return httpx.post(server.url + path, content=body, headers={"content-type": "application/json"}, timeout=60)
    return httpx.post(server.url + path, json=body, timeout=60)


# ================================================================================ bad input: 400s
@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", '{"prompt": "a\\ud800b", "max_tokens": 1}', "prompt"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x\\ud800"}]}', "messages"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", '
                             '"function": {"name": "f\\udc00"}}]}', "tools"),
    ("/tokenize", '{"prompt": "\\ud800"}', "prompt"),
    ("/tokenize", '{"messages": [{"role": "user", "content": "\\udfff"}]}', "messages"),
])
def test_lone_surrogate_is_a_400_naming_the_field(api, path, body, param):
    err = assert_error(post(api, path, body), 400, "lone surrogate", param=param)
    assert err["message"].startswith(param)


def test_tool_choice_function_as_a_string_400(api):
    body = {"messages": USER, "tools": TOOLS, "tool_choice": {"type": "function", "function": "get_weather"}}
    assert_error(post(api, "/v1/chat/completions", body), 400, "tool_choice", param="tool_choice")


def test_tokenize_continue_final_message_without_messages_400(api):
    r = post(api, "/tokenize", {"messages": [], "continue_final_message": True})
    assert_error(r, 400, "continue_final_message", param="continue_final_message")
    assert post(api, "/tokenize", {"messages": []}).status_code == 200  # the generation prompt alone


@pytest.mark.parametrize("extra, param", [
    ({"stream": "yes"}, "stream"),
    ({"prompt": [False]}, "prompt"),
    ({"prompt": [[1, True]]}, "prompt"),
    ({"n": "2"}, "n"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"echo": 1}, "echo"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream: true
    ({"stream": True, "prompt_logprobs": 1}, "prompt_logprobs"),  # cannot be streamed
])
def test_lax_values_are_refused_not_coerced(api, extra, param):
    body = {"prompt": [5, 6], "max_tokens": 2, **extra}
    assert_error(post(api, "/v1/completions", body), 400, param, param=param)


def test_request_that_can_never_be_admitted_is_a_400(api):
    """More sequences than running + queued room: a 400 (retrying cannot help), not a 503 to retry."""
    capacity = MAX_NUM_SEQS + MAX_QUEUED
    r = post(api, "/v1/completions", {"prompt": [[5]] * (capacity + 1), "max_tokens": 1})
    err = assert_error(r, 400, str(capacity + 1), "--max-queued-requests", param="prompt")
    assert err["type"] == "invalid_request_error" and "retry-after" not in r.headers
    ok = post(api, "/v1/completions", {"prompt": [[5]] * capacity, "max_tokens": 1})  # exactly fits
    assert ok.status_code == 200 and len(ok.json()["choices"]) == capacity


# ============================================================================= endpoints, replies
def test_model_by_id_and_unknown_routes(api):
    client = OpenAI(base_url=api.url + "/v1", api_key="unused", max_retries=0)
    card = client.models.retrieve("scripted")
    assert card.id == "scripted" and card.model_extra["max_model_len"] > 0
    assert httpx.get(api.url + "/v1/models/scripted").json() == httpx.get(api.url + "/v1/models").json()["data"][0]
    err = assert_error(httpx.get(api.url + "/v1/models/gpt-9"), 404, "gpt-9", param="model")
    assert err["code"] == "model_not_found"
    err = assert_error(httpx.post(api.url + "/v1/no-such-thing", json={}), 404, "Invalid URL (POST /v1/no-such-thing)")
    assert err["type"] == "invalid_request_error"


def test_reply_without_tool_calls_has_no_tool_calls_key(api):
    plain = post(api, "/v1/chat/completions", {"messages": ANSWER, "tools": TOOLS, "continue_final_message": True,
                                               "add_generation_prompt": False}).json()
    message = plain["choices"][0]["message"]
    assert message["content"] == "The weather in Paris is sunny." and "tool_calls" not in message
    called = post(api, "/v1/chat/completions", {"messages": USER, "tools": TOOLS}).json()["choices"][0]
    assert called["finish_reason"] == "tool_calls" and called["message"]["tool_calls"][0]["function"]["name"]


def test_access_log_with_request_ids(api):
    ok = post(api, "/v1/completions", {"prompt": [5], "max_tokens": 1})
    bad = post(api, "/v1/completions", {"prompt": [5], "max_tokens": "many"})
    rid_ok, rid_bad = ok.headers["x-request-id"], bad.headers["x-request-id"]
    assert ok.json()["id"] == f"cmpl-{rid_ok}"  # the response id carries the request id
    deadline = time.time() + 10
    while time.time() < deadline and rid_bad not in api.log_path.read_text():
        time.sleep(0.05)
    lines = api.log_path.read_text().splitlines()
    ok_line = next(line for line in lines if rid_ok in line)
    bad_line = next(line for line in lines if rid_bad in line)
    assert " INFO " in ok_line and "POST /v1/completions 200" in ok_line
    assert " WARNING " in bad_line and "POST /v1/completions 400" in bad_line and "max_tokens" in bad_line


# ================================================================================ the event loop
def test_health_stays_quick_while_a_huge_prompt_is_tokenized(api):
    """A 2 MB prompt takes seconds to tokenize; that happens on a worker thread, so /health (and every
    stream) keeps answering meanwhile. The prompt is then refused as too long."""
    prompt = ("The quick brown fox jumps over the lazy dog. " * 50000)[:2_000_000]
    result = {}

    def big() -> None:
        t0 = time.perf_counter()
        result["response"] = post(api, "/v1/completions", {"prompt": prompt, "max_tokens": 1})
        result["seconds"] = time.perf_counter() - t0

    thread = threading.Thread(target=big)
    thread.start()
    time.sleep(0.3)  # the body is sent and tokenizing
    latencies = []
    with httpx.Client(timeout=60) as h:
        while thread.is_alive():
            t0 = time.perf_counter()
            assert h.get(api.url + "/health").status_code == 200
            latencies.append(time.perf_counter() - t0)
            time.sleep(0.05)
    thread.join()
    assert_error(result["response"], 400, "maximum context length")
    assert len(latencies) >= 5, (latencies, result["seconds"])
    assert max(latencies) < result["seconds"] / 3, (max(latencies), result["seconds"])


# ================================================================================= OpenAPI document
def test_openapi_document_describes_the_server(api):
    doc = httpx.get(api.url + "/openapi.json").json()
    assert '"422"' not in json.dumps(doc) and "HTTPValidationError" not in doc["components"]["schemas"]
    for path in ("/v1/chat/completions", "/v1/completions"):
        responses = doc["paths"][path]["post"]["responses"]
        assert set(responses) == {"200", "400", "401", "404", "413", "503"}
        assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}
        assert responses["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    for path in ("/health", "/ping"):
        assert all(not r.get("content") for r in doc["paths"][path]["get"]["responses"].values())
        assert httpx.get(api.url + path).content == b""
    schemas = doc["components"]["schemas"]
    chat = schemas["ChatCompletionRequest"]["properties"]
    assert chat["messages"]["items"]["oneOf"]  # assistant messages, and the rest (content required)
    assert "Tool" in json.dumps(chat["tools"]) and "NamedToolChoice" in json.dumps(chat["tool_choice"])
    assert "ResponseFormat" in json.dumps(chat["response_format"])
    assert {"ChatCompletionChunk", "CompletionChunk", "ChatCompletionResponse", "ModelCard"} <= set(schemas)


def test_schemathesis_against_the_document(api):
    """Schema-valid requests of every operation (a few each, deterministic): no 5xx, only documented
    statuses and content types, and bodies that match the documented response schemas."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.checks import (
        content_type_conformance,
        not_a_server_error,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    schema = schemathesis.openapi.from_url(api.url + "/openapi.json")
    statuses: dict[str, set] = {}
    for result in schema.get_all_operations():
        op = result.ok()
        statuses[op.label] = set()

        @settings(max_examples=5, derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
        @given(case=op.as_strategy())
        def check(case):
            if isinstance(case.body, dict):
                case.body.pop("model", None)  # a random name is a 404: reach the rest too
                for k in ("max_tokens", "max_completion_tokens"):
                    if isinstance(case.body.get(k), int) and case.body[k] > 8:
                        case.body[k] = 8  # keeps the run short
            response = case.call(base_url=api.url, timeout=60)
            statuses[op.label].add(response.status_code)  # noqa: B023 (check runs within this iteration)
            case.validate_response(response, checks=checks)

        check()
    assert all(statuses.values()) and len(statuses) >= 10
    assert any(200 in s for label, s in statuses.items() if "completions" in label), statuses
    assert httpx.get(api.url + "/health").status_code == 200
