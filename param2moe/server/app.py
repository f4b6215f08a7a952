"""The OpenAI-compatible HTTP server: `param2moe serve`.

`build_app(async_engine, options)` makes the FastAPI app; `run_server(args)` loads the engine, serves
with uvicorn, and on SIGTERM (or Ctrl-C) stops taking requests, lets those in flight finish for up to
--drain-seconds, aborts the rest and exits with status 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import signal
import threading
import time
import uuid
from dataclasses import dataclass, fields

import anyio
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..engine import SamplingParams
from ..engine.async_engine import AsyncLLMEngine, EngineDeadError
from ..engine.config import sampling_defaults
from ..parsers import prompt_ends_in_reasoning
from .metrics import ServerMetrics
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    RequestError,
    TokenizeRequest,
    error_body,
    to_sampling_fields,
)
from .serving import (
    ChatContext,
    CompletionContext,
    CompletionPrompt,
    TokenText,
    chat_full,
    chat_stream,
    completion_full,
    completion_stream,
    now,
)
from .structured import structured_outputs

log = logging.getLogger("param2moe.server")

_RESERVED_TEMPLATE_KWARGS = {"messages", "tools", "add_generation_prompt"}
_OPEN_PATHS = {"/health", "/metrics", "/version", "/ping"}
_SEED_LIMIT = 1 << 62


@dataclass
class ServerOptions:
    served_model_name: str | None = None
    api_key: str | None = None
    max_queued_requests: int = 1024
    max_request_bytes: int = 4 << 20
    drain_seconds: float = 10.0

    @classmethod
    def from_args(cls, args) -> ServerOptions:
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})


def generation_defaults(gen: dict) -> dict:
    """Sampling defaults from the checkpoint's generation_config.json (vLLM's `--generation-config auto`)."""
    out = sampling_defaults(gen)
    if isinstance(gen.get("max_new_tokens"), int):
        out["max_new_tokens"] = gen["max_new_tokens"]
    return out


class ServerState:
    def __init__(self, async_engine: AsyncLLMEngine, options: ServerOptions):
        engine = async_engine.engine
        self.async_engine, self.engine, self.options = async_engine, engine, options
        self.tokenizer = engine.tokenizer
        model_dir = engine.config.model
        self.model_name = options.served_model_name or engine.config.model_name
        self.model_root = model_dir or ""
        self.max_model_len = engine.max_model_len
        self.vocab_size = engine.model_config.vocab_size
        self.max_num_seqs = engine.config.max_num_seqs
        self.defaults = generation_defaults(engine.generation_config)
        self.metrics = ServerMetrics(async_engine, self.model_name)
        self.token_text = TokenText(self.tokenizer)
        self.created = now()
        self.pending_seqs = 0
        self.draining = False
        im_end = self.tokenizer.token_to_id("<|im_end|>") if self.tokenizer else None
        self.chat_stop_ids = [im_end] if im_end is not None and im_end not in engine.eos_token_ids else []

    # ------------------------------------------------------------------ checks
    def check_model(self, name: str | None) -> None:
        if name is not None and name not in (self.model_name, self.model_root):
            raise RequestError(f"The model `{name}` does not exist (this server serves `{self.model_name}`).",
                               "model", status=404, code="model_not_found")

    def need_tokenizer(self) -> None:
        if self.tokenizer is None:
            raise RequestError("this model has no tokenizer: give prompts as token ids", "prompt")

    def admit(self, n: int) -> None:
        """Take n sequences' worth of room, or refuse with 503 when the queue is full."""
        if self.draining:
            self.metrics.count_request("rejected")
            raise RequestError("the server is shutting down", status=503, type="service_unavailable",
                               code="shutting_down")
        queued_room = self.options.max_queued_requests
        # Room for max_num_seqs running and max_queued_requests waiting; and the engine's own queue
        # (sequences that wait for KV-cache room) may not grow past the limit either.
        if (self.pending_seqs + n > self.max_num_seqs + queued_room
                or self.async_engine.num_waiting >= queued_room > 0):
            self.metrics.count_request("rejected")
            raise RequestError(f"too many requests waiting (--max-queued-requests {queued_room}); retry later",
                               status=503, type="service_unavailable", code="queue_full")
        self.pending_seqs += n

    def release(self, n: int) -> None:
        self.pending_seqs -= n

    def max_tokens(self, requested: int | None, num_prompt: int, field: str) -> int:
        room = self.max_model_len - num_prompt
        if requested is None:
            if room < 1:
                raise RequestError(
                    f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                    f"{field} has {num_prompt} tokens, which leaves no room for a completion. Please reduce the "
                    f"length of the {field}.", field, code="context_length_exceeded")
            default = self.defaults.get("max_new_tokens")
            return min(room, default) if default else room
        if requested > room:
            raise RequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{num_prompt + requested} tokens ({num_prompt} in the {field}, {requested} in the completion). "
                f"Please reduce the length of the {field} or completion.", field, code="context_length_exceeded")
        return requested

    def check_prompt_ids(self, ids: list[int], field: str) -> None:
        if not ids:
            raise RequestError(f"{field}: empty (no tokens)", field)
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise RequestError(f"{field}: token id {bad} is outside the vocabulary [0, {self.vocab_size})", field)

    def sampling_params(self, req, *, logprobs: int | None, max_tokens: int, extra_stop_ids=(),
                        structured_outputs=None) -> SamplingParams:
        f = to_sampling_fields(req, self.defaults, self.vocab_size, logprobs=logprobs, max_tokens=max_tokens)
        f["structured_outputs"] = structured_outputs
        if f["n"] is not None and isinstance(f["n"], int) and f["n"] > self.max_num_seqs:
            raise RequestError(f"n={f['n']}: at most {self.max_num_seqs} (--max-num-seqs)", "n")
        if f["seed"] is not None and not -_SEED_LIMIT <= f["seed"] < _SEED_LIMIT:
            raise RequestError(f"seed={f['seed']}: must be in [-2^62, 2^62)", "seed")
        if f["top_k"] is not None and f["top_k"] > self.vocab_size:
            f["top_k"] = -1  # no limit
        if extra_stop_ids and not f["ignore_eos"]:
            f["stop_token_ids"] = list(f["stop_token_ids"]) + [t for t in extra_stop_ids
                                                             if t not in f["stop_token_ids"]]
        try:
            return SamplingParams(**f)
        except (ValueError, TypeError) as e:
            msg = str(e)
            param = msg.split("=", 1)[0] if "=" in msg.split(":", 1)[0] else None
            raise RequestError(msg, param) from None

    def request_id(self, prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex}"


# ----------------------------------------------------------------------------------- chat preparation
def _message_text(content, i: int) -> str | None:
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise RequestError(f"messages[{i}].content: only text parts are supported (got {kind!r})",
                                   "messages")
        return "\n".join(parts)
    raise RequestError(f"messages[{i}].content: expected a string or a list of parts", "messages")


def normalize_messages(messages: list) -> list[dict]:
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RequestError(f"messages[{i}]: expected an object", "messages")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise RequestError(f"messages[{i}].role: required (a string)", "messages")
        m = dict(m)
        if role == "developer":
            m["role"] = role = "system"
        m["content"] = _message_text(m.get("content"), i)
        if m["content"] is None:
            if role == "assistant":
                m["content"] = ""
            else:
                raise RequestError(f"messages[{i}].content: required for role {role!r}", "messages")
        calls = m.get("tool_calls")
        if calls is not None:
            if role != "assistant" or not isinstance(calls, list):
                raise RequestError(f"messages[{i}].tool_calls: a list, on assistant messages only", "messages")
            for tc in calls:
                f = tc.get("function") if isinstance(tc, dict) else None
                if not isinstance(f, dict) or not isinstance(f.get("name"), str):
                    raise RequestError(f"messages[{i}].tool_calls: each needs function.name", "messages")
                if not isinstance(f.get("arguments", "{}"), (str, dict)):
                    raise RequestError(f"messages[{i}].tool_calls: function.arguments must be a JSON string",
                                       "messages")
        out.append(m)
    return out


def check_tools(tools, tool_choice) -> tuple[list[dict] | None, bool]:
    """(tools for the template, whether to parse tool calls)."""
    if tools is not None:
        for k, t in enumerate(tools):
            f = t.get("function") if isinstance(t, dict) else None
            if not isinstance(f, dict) or t.get("type", "function") != "function" or not isinstance(f.get("name"), str):
                raise RequestError(f"tools[{k}]: expected {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}",
                                   "tools")
    if not tools:
        if isinstance(tool_choice, dict) or tool_choice == "required":
            raise RequestError("tool_choice: needs tools", "tool_choice")
        return None, False
    if tool_choice == "none":
        return None, False
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name") if tool_choice.get("type") == "function" else None
        chosen = [t for t in tools if t["function"]["name"] == name]
        if not chosen:
            raise RequestError(f"tool_choice: no tool named {name!r} in tools", "tool_choice")
        return chosen, True
    return tools, True


def render_chat(st: ServerState, messages, tools, add_generation_prompt: bool, continue_final_message: bool,
                template_kwargs: dict | None) -> str:
    st.need_tokenizer()
    messages = normalize_messages(messages)
    if continue_final_message:
        if messages[-1]["role"] != "assistant":
            raise RequestError("continue_final_message: the last message must be the assistant's",
                               "continue_final_message")
        add_generation_prompt = False
    kwargs = {k: v for k, v in (template_kwargs or {}).items() if k not in _RESERVED_TEMPLATE_KWARGS}
    try:
        text = st.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                                **kwargs)
    except RequestError:
        raise
    except Exception as e:  # the template raised (raise_exception, a missing key, the sandbox)
        raise RequestError(f"the chat template failed on these messages: {type(e).__name__}: {e}",
                           "messages") from None
    if continue_final_message:
        final = messages[-1]["content"]
        cut = text.rfind(final) if final else -1
        if cut < 0:
            raise RequestError("continue_final_message: the final message is not in the rendered prompt",
                               "continue_final_message")
        text = text[: cut + len(final)]
    return text


# ------------------------------------------------------------------------------------------- responses
class SSEResponse(StreamingResponse):
    """Server-sent events that notice a client going away at once (not only at the next write), then
    close the body generator so that the engine request is aborted and its KV blocks freed."""

    def __init__(self, content, on_close=None):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as tg:
                async def stream() -> None:
                    with contextlib.suppress(OSError):
                        await self.stream_response(send)
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                with contextlib.suppress(Exception):
                    await self.body_iterator.aclose()
                if self.on_close is not None:
                    self.on_close()


async def _until_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class ClientGone(Exception):
    pass


async def run_until_disconnect(request: Request, coro):
    """Await coro, but cancel it (aborting its engine request) if the client disconnects first."""
    task = asyncio.ensure_future(coro)
    watch = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            raise ClientGone()
    return task.result()


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code=None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status, headers=headers)


def _validation_message(errors) -> tuple[str, str | None]:
    parts, param = [], None
    for e in errors[:5]:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        if e.get("type") == "json_invalid":
            ctx = e.get("ctx") or {}
            return f"the body is not valid JSON: {ctx.get('error', e.get('msg'))}", None
        where = ".".join(loc)
        param = param or (loc[0] if loc else None)
        parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    return "; ".join(parts) or "invalid request body", param


# -------------------------------------------------------------------------------------------- the app
class _Guard:
    """ASGI middleware: the API key (Authorization: Bearer) and the request-body size limit."""

    def __init__(self, app, state: ServerState):
        self.app, self.st = app, state

    async def _reply(self, send, status: int, body: dict, headers=()) -> None:
        data = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                                *headers]})
        await send({"type": "http.response.body", "body": data})

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        key = self.st.options.api_key
        if key and scope["path"] not in _OPEN_PATHS and scope.get("method") != "OPTIONS":
            auth = headers.get(b"authorization", b"").decode("latin-1")
            token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), key.encode()):
                return await self._reply(send, 401, error_body(
                    "Unauthorized: a valid API key is required (Authorization: Bearer <key>)",
                    "authentication_error", code="invalid_api_key"), [(b"www-authenticate", b"Bearer")])
        limit = self.st.options.max_request_bytes
        too_large = error_body(f"the request body is larger than the limit of {limit} bytes (--max-request-bytes)",
                               "invalid_request_error", code="request_too_large")
        length = headers.get(b"content-length")
        if limit and length is not None:
            try:
                if int(length) > limit:
                    return await self._reply(send, 413, too_large)
            except ValueError:
                return await self._reply(send, 400, error_body("bad Content-Length header"))
        if not limit:
            return await self.app(scope, receive, send)
        state = {"received": 0, "over": False, "started": False}

        async def limited_receive():
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > limit:
                    state["over"] = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if state["over"]:
                return  # the app's own reply to a cut body is replaced by the 413 below
            state["started"] = True
            await send(message)

        await self.app(scope, limited_receive, guarded_send)
        if state["over"] and not state["started"]:
            await self._reply(send, 413, too_large)


def build_app(async_engine: AsyncLLMEngine, options: ServerOptions | None = None) -> FastAPI:
    """The app; its ServerState is app.state.server."""
    st = ServerState(async_engine, options or ServerOptions())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await async_engine.shutdown(0.0)

    app = FastAPI(title="param2moe", version=__version__, lifespan=lifespan)
    app.state.server = st

    # ---------------------------------------------------------------- errors, all in OpenAI's shape
    @app.exception_handler(RequestError)
    async def _request_error(request, e: RequestError):
        headers = {"Retry-After": "1"} if e.status == 503 else None
        return error_response(e.status, e.message, e.type, e.param, e.code, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        message, param = _validation_message(e.errors())
        return error_response(400, message, param=param, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(e.status_code, str(e.detail), kind, headers=getattr(e, "headers", None))

    @app.exception_handler(EngineDeadError)
    async def _engine_dead(request, e):
        return error_response(503, str(e), "service_unavailable", code="shutting_down", headers={"Retry-After": "1"})

    @app.exception_handler(ClientGone)
    async def _client_gone(request, e):
        return Response(status_code=499)

    @app.exception_handler(ValueError)
    async def _value_error(request, e: ValueError):  # EngineError and other invalid values
        msg = str(e)
        param = msg.split(":", 1)[0].split("=", 1)[0].strip() if ":" in msg else None
        return error_response(400, msg, param=param if param and param.isidentifier() else None,
                              code="invalid_value")

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        log.exception("unhandled error on %s", request.url.path, exc_info=e)
        return error_response(500, f"internal error: {type(e).__name__}", "internal_server_error",
                              code="internal_error")

    # ---------------------------------------------------------------- plain endpoints
    @app.get("/health")
    async def health():
        if st.draining:
            return Response(status_code=503)
        return Response(status_code=200)

    @app.get("/ping")
    async def ping():
        return Response(status_code=200)

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics():
        return Response(st.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": st.model_name, "object": "model", "created": st.created, "owned_by": "param2moe",
            "root": st.model_root, "parent": None, "max_model_len": st.max_model_len}]}

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        st.check_model(req.model)
        st.need_tokenizer()
        if (req.prompt is None) == (req.messages is None):
            raise RequestError("give either prompt or messages", "prompt")
        if req.messages is not None:
            tools, _ = check_tools(req.tools, None)
            text = render_chat(st, req.messages, tools, req.add_generation_prompt, req.continue_final_message,
                               req.chat_template_kwargs)
            ids = st.tokenizer.encode(text, add_special_tokens=bool(req.add_special_tokens))
        else:
            add = True if req.add_special_tokens is None else req.add_special_tokens
            ids = st.tokenizer.encode(req.prompt, add_special_tokens=add)
        body = {"count": len(ids), "max_model_len": st.max_model_len, "tokens": ids}
        if req.return_token_strs:
            body["token_strs"] = [st.tokenizer.id_to_token(i) for i in ids]
        return body

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        st.check_model(req.model)
        st.need_tokenizer()
        bad = next((t for t in req.tokens if not 0 <= t < st.vocab_size), None)
        if bad is not None:
            raise RequestError(f"tokens: token id {bad} is outside the vocabulary [0, {st.vocab_size})", "tokens")
        return {"prompt": st.tokenizer.decode(req.tokens, skip_special_tokens=False)}

    # ---------------------------------------------------------------- generation
    def _finish_request(trackers, n: int):
        def close():
            st.release(n)
            for t in trackers:
                t.finish("abort")  # no-op for those that finished
        return close

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        st.check_model(req.model)
        if req.top_logprobs is not None and not req.logprobs:
            raise RequestError("top_logprobs: needs logprobs=true", "top_logprobs")
        tools, parse_tools = check_tools(req.tools, req.tool_choice)
        text = render_chat(st, req.messages, tools, req.add_generation_prompt, req.continue_final_message,
                           req.chat_template_kwargs)
        ids = st.tokenizer.encode(text, add_special_tokens=req.add_special_tokens)
        st.check_prompt_ids(ids, "messages")
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = st.max_tokens(requested, len(ids), "messages")
        top = (req.top_logprobs or 0) if req.logprobs else None
        so = await structured_outputs(st, req, prompt=text, tools=tools if parse_tools else None)
        params = st.sampling_params(req, logprobs=top, max_tokens=max_tokens, extra_stop_ids=st.chat_stop_ids,
                                    structured_outputs=so)
        st.admit(params.n)
        rid = st.request_id("chatcmpl")
        opts = req.stream_options
        ctx = ChatContext(rid, st.model_name, now(), n=params.n, num_prompt_tokens=len(ids),
                          start_in_reasoning=prompt_ends_in_reasoning(text), parse_tools=parse_tools,
                          top_logprobs=top, include_usage=bool(opts and opts.include_usage),
                          continuous_usage=bool(opts and opts.continuous_usage_stats),
                          hidden_stop_ids=frozenset(st.chat_stop_ids), token_text=st.token_text,
                          prompt_logprobs=req.prompt_logprobs is not None)
        tracker = st.metrics.tracker(len(ids))
        close = _finish_request([tracker], params.n)
        try:
            stream = async_engine.generate({"prompt": text, "prompt_token_ids": ids}, params, rid)
            if req.stream:
                return SSEResponse(chat_stream(stream, ctx, tracker), on_close=close)
        except BaseException:
            close()
            raise
        try:
            return JSONResponse(await run_until_disconnect(request, chat_full(stream, ctx, tracker)))
        except ClientGone:
            raise
        except Exception:
            tracker.finish("error")
            raise
        finally:
            close()

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        st.check_model(req.model)
        if req.suffix:
            raise RequestError("suffix: not supported", "suffix")
        raw = req.prompt
        if isinstance(raw, str):
            raw = [raw]
        elif raw and isinstance(raw[0], int):
            raw = [raw]
        if not raw:
            raise RequestError("prompt: empty", "prompt")
        prompts = []
        for p in raw:
            if isinstance(p, str):
                st.need_tokenizer()
                ids = st.tokenizer.encode(p, add_special_tokens=req.add_special_tokens)
                prompts.append(CompletionPrompt(p, ids))
            else:
                ids = list(p)
                text = st.tokenizer.decode(ids, skip_special_tokens=False) if (st.tokenizer and req.echo) else ""
                prompts.append(CompletionPrompt(text, ids))
        for p in prompts:
            st.check_prompt_ids(p.token_ids, "prompt")
        longest = max(len(p.token_ids) for p in prompts)
        max_tokens = st.max_tokens(req.max_tokens, longest, "prompt")
        if req.max_tokens is None:  # each prompt gets the rest of its own context
            max_tokens = None
        want_prompt_logprobs = req.prompt_logprobs is not None
        if req.logprobs is not None and req.echo and req.prompt_logprobs is None:
            req.prompt_logprobs = req.logprobs
        params_list = []
        so = await structured_outputs(st, req)
        for p in prompts:
            mt = max_tokens if max_tokens is not None else st.max_tokens(None, len(p.token_ids), "prompt")
            params_list.append(st.sampling_params(req, logprobs=req.logprobs, max_tokens=mt, structured_outputs=so))
        n = params_list[0].n
        total = n * len(prompts)
        st.admit(total)
        rid = st.request_id("cmpl")
        opts = req.stream_options
        ctx = CompletionContext(rid, st.model_name, now(), prompts, n=n, logprobs=req.logprobs, echo=bool(req.echo),
                                include_usage=bool(opts and opts.include_usage),
                                continuous_usage=bool(opts and opts.continuous_usage_stats), token_text=st.token_text,
                                prompt_logprobs=want_prompt_logprobs)
        trackers = [st.metrics.tracker(len(p.token_ids)) for p in prompts]
        close = _finish_request(trackers, total)
        try:
            streams = [async_engine.generate({"prompt": p.text or None, "prompt_token_ids": p.token_ids}, params,
                                             f"{rid}-{k}") for k, (p, params) in enumerate(zip(prompts, params_list))]
            if req.stream:
                return SSEResponse(completion_stream(streams, ctx, trackers), on_close=close)
        except BaseException:
            close()
            raise
        try:
            return JSONResponse(await run_until_disconnect(request, completion_full(streams, ctx, trackers)))
        except ClientGone:
            raise
        except Exception:
            for t in trackers:
                t.finish("error")
            raise
        finally:
            close()

    app.add_middleware(_Guard, state=st)
    return app


# ----------------------------------------------------------------------------------------- running
def run_server(args) -> int:
    from ..engine import EngineConfig, LLMEngine

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = ServerOptions.from_args(args)
    t0 = time.perf_counter()
    engine = LLMEngine(EngineConfig.from_cli_args(args))
    async_engine = AsyncLLMEngine(engine)
    app = build_app(async_engine, options)
    st = app.state.server
    log.info("loaded %s in %.1f s (max_model_len %d, %d KV blocks of %d tokens); serving `%s` on http://%s:%d",
             st.model_root or st.model_name, time.perf_counter() - t0, st.max_model_len,
             len(engine.block_manager.blocks), engine.block_manager.block_size, st.model_name, args.host, args.port)
    # Keep-alive: uvicorn's 5 s default closed idle connections just as busy clients reused them
    # (a ReadError before any response, ~2 in 1000 requests at 256 concurrent streams); 60 s did not.
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5, lifespan="on", timeout_keep_alive=60)
    _DrainingServer(config, st, options.drain_seconds).run()
    if hasattr(engine, "shutdown"):
        engine.shutdown()
    log.info("stopped")
    return 0


class _DrainingServer(uvicorn.Server):
    """uvicorn's Server with our own signal handling: the first SIGTERM/SIGINT drains, a second one
    aborts what is left at once; either way the process exits with status 0 (uvicorn's own handler
    would re-raise the signal after shutting down)."""

    def __init__(self, config, st: ServerState, drain_seconds: float):
        super().__init__(config)
        self.st, self.drain_seconds = st, drain_seconds
        self._drain_task: asyncio.Task | None = None

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            yield
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    def _on_signal(self, sig) -> None:
        name = signal.Signals(sig).name
        if self._drain_task is None:
            log.info("%s: no new requests; draining those in flight (up to %.0f s), then stopping", name,
                     self.drain_seconds)
            self._drain_task = asyncio.ensure_future(self._drain(self.drain_seconds))
        else:
            log.info("%s again: aborting the requests in flight", name)
            self._drain_task.cancel()
            self._drain_task = asyncio.ensure_future(self._drain(0.0))

    async def _drain(self, seconds: float) -> None:
        self.st.draining = True
        await self.st.async_engine.shutdown(seconds)
        await asyncio.sleep(0.2)  # let the last responses go out
        self.should_exit = True
