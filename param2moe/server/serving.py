"""Turn the engine's output stream into OpenAI responses: whole JSON bodies and SSE chunks.

The builders take any async iterator of RequestOutput deltas (the engine's, or a fake one in tests)
and know nothing of HTTP. Chat output goes through the reasoning parser (<think>...</think> to
`reasoning_content`) and, when tools are on, the tool-call parser (<tool_call>{json}</tool_call> to
`tool_calls`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import lru_cache

from ..parsers import ReasoningParser, split_reasoning
from .protocol import error_body
from .tool_parser import ToolCallParser, extract_tool_calls

log = logging.getLogger("param2moe.server")

_MIN_LOGPROB = -9999.0  # JSON has no -inf


_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse(obj) -> str:
    # JSON keeps U+0085, U+2028 and U+2029 raw; clients that split lines with str.splitlines (httpx's
    # aiter_lines, for one) would cut the event there, so they go out escaped.
    return f"data: {json.dumps(obj, ensure_ascii=False).translate(_LINE_BREAKS)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable char that stands for each byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class TokenText:
    """Token strings and bytes for logprobs, cached per token id."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self._text: dict[int, str] = {}
        self._bytes: dict[int, list[int]] = {}

    def text(self, token_id: int, logprob=None) -> str:
        decoded = getattr(logprob, "decoded_token", None)
        if decoded is not None:
            return decoded
        if token_id not in self._text:
            self._text[token_id] = self.tok.decode([token_id], skip_special_tokens=False) if self.tok else ""
        return self._text[token_id]

    def bytes(self, token_id: int, logprob=None) -> list[int]:
        """The token's own bytes (a byte-level piece may hold part of a UTF-8 character)."""
        if token_id not in self._bytes:
            piece = self.tok.id_to_token(token_id) if self.tok else None
            dec = _byte_decoder()
            if piece is not None and all(ch in dec for ch in piece):
                self._bytes[token_id] = [dec[ch] for ch in piece]
            else:
                return list(self.text(token_id, logprob).encode("utf-8"))
        return self._bytes[token_id]


def _lp(value) -> float:
    v = float(value)
    return v if v > _MIN_LOGPROB else _MIN_LOGPROB


def _rank(lp) -> int:
    r = getattr(lp, "rank", None)
    return r if r is not None else 1


# --------------------------------------------------------------------------------------------- chat
@dataclass
class ChatContext:
    request_id: str
    model: str
    created: int
    n: int = 1
    num_prompt_tokens: int = 0
    start_in_reasoning: bool = False
    parse_tools: bool = False
    top_logprobs: int | None = None  # None: no logprobs
    include_usage: bool = False
    continuous_usage: bool = False
    hidden_stop_ids: frozenset = frozenset()  # stop token ids added by the server (not shown as stop_reason)
    token_text: TokenText | None = None
    prompt_logprobs: bool = False  # return them (non-streaming)


def chat_logprobs(ctx: ChatContext, token_ids: list[int], entries) -> list[dict]:
    out = []
    tt = ctx.token_text
    for tid, entry in zip(token_ids, entries or []):
        if entry is None:
            continue
        chosen = entry.get(tid)
        top = sorted(((t, lp) for t, lp in entry.items() if _rank(lp) <= (ctx.top_logprobs or 0)),
                     key=lambda x: _rank(x[1]))
        out.append({
            "token": tt.text(tid, chosen), "logprob": _lp(chosen) if chosen is not None else _MIN_LOGPROB,
            "bytes": tt.bytes(tid, chosen),
            "top_logprobs": [{"token": tt.text(t, lp), "logprob": _lp(lp), "bytes": tt.bytes(t, lp)} for t, lp in top],
        })
    return out


def prompt_logprobs_json(entries) -> list | None:
    """vLLM's `prompt_logprobs`: per prompt token, None (the first) or {token id: {logprob, rank, decoded_token}}."""
    if entries is None:
        return None
    return [None if e is None else {str(t): {"logprob": _lp(lp), "rank": getattr(lp, "rank", None),
                                             "decoded_token": getattr(lp, "decoded_token", None)}
                                    for t, lp in e.items()} for e in entries]


def _stop_reason(ctx, reason):
    return None if reason in ctx.hidden_stop_ids else reason


def _usage(num_prompt: int, num_completion: int, cached: int = 0) -> dict:
    u = {"prompt_tokens": num_prompt, "completion_tokens": num_completion, "total_tokens": num_prompt + num_completion}
    if cached:
        u["prompt_tokens_details"] = {"cached_tokens": cached}
    return u


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def absorb(self, c) -> None:
        """Add one DELTA CompletionOutput of this choice."""
        self.text.append(c.text)
        self.token_ids.extend(c.token_ids)
        if c.logprobs:
            self.logprobs.extend(c.logprobs)
        if c.finish_reason is not None:
            self.finish_reason, self.stop_reason = c.finish_reason, c.stop_reason


def _outcome(reasons: list[str | None]) -> str:
    r = reasons[0] if reasons else None
    return r if r in ("stop", "length", "tool_calls") else "abort" if r == "abort" else "error"


async def chat_full(stream: AsyncIterator, ctx: ChatContext, tracker=None) -> dict:
    """The whole chat completion body."""
    choices = [_Choice() for _ in range(ctx.n)]
    cached = 0
    prompt_lps = None
    async with contextlib.aclosing(merge_streams([stream])) as merged:
        async for _, out in merged:
            if tracker is not None:
                tracker.on_output(out)
            cached = max(cached, out.num_cached_tokens or 0)
            if out.prompt_logprobs is not None and prompt_lps is None:
                prompt_lps = out.prompt_logprobs
            for c in out.outputs:
                choices[c.index].absorb(c)
    body_choices = []
    for i, ch in enumerate(choices):
        reasoning, content = split_reasoning("".join(ch.text), ctx.start_in_reasoning)
        calls = []
        if ctx.parse_tools:
            content, calls = extract_tool_calls(content)
        finish = "tool_calls" if calls else ch.finish_reason
        message = {"role": "assistant", "content": content, "reasoning_content": reasoning,
                   "tool_calls": [c.to_dict() for c in calls]}
        body_choices.append({
            "index": i, "message": message,
            "logprobs": ({"content": chat_logprobs(ctx, ch.token_ids, ch.logprobs)}
                         if ctx.top_logprobs is not None else None),
            "finish_reason": finish, "stop_reason": _stop_reason(ctx, ch.stop_reason)})
    if tracker is not None:
        tracker.finish(_outcome([c["finish_reason"] for c in body_choices]))
    body = {"id": ctx.request_id, "object": "chat.completion", "created": ctx.created, "model": ctx.model,
            "choices": body_choices,
            "usage": _usage(ctx.num_prompt_tokens, sum(len(c.token_ids) for c in choices), cached)}
    if ctx.prompt_logprobs:
        body["prompt_logprobs"] = prompt_logprobs_json(prompt_lps)
    return body


def _sse_chunk(ctx, obj: str, choice: dict, logprobs, finish, stop_reason, usage) -> str:
    """One SSE event of a streamed chat or text completion (one choice)."""
    choice = {**choice, "logprobs": logprobs, "finish_reason": finish}
    if finish is not None:
        choice["stop_reason"] = stop_reason
    body = {"id": ctx.request_id, "object": obj, "created": ctx.created, "model": ctx.model, "choices": [choice]}
    if usage is not None:
        body["usage"] = usage
    return sse(body)


async def chat_stream(stream: AsyncIterator, ctx: ChatContext, tracker=None) -> AsyncIterator[str]:
    """SSE chunks of a chat completion, ending in `data: [DONE]`."""
    def chunk(index: int, delta: dict, finish=None, logprobs=None, stop_reason=None, usage=None) -> str:
        return _sse_chunk(ctx, "chat.completion.chunk", {"index": index, "delta": delta}, logprobs, finish,
                          stop_reason, usage)

    reasoning = [ReasoningParser(ctx.start_in_reasoning) for _ in range(ctx.n)]
    tools = [ToolCallParser() for _ in range(ctx.n)]
    pending_ws = [""] * ctx.n
    done = [False] * ctx.n
    num_completion = 0
    cached = 0
    reasons: list[str | None] = [None] * ctx.n
    try:
        for i in range(ctx.n):
            yield chunk(i, {"role": "assistant", "content": ""})
        async with contextlib.aclosing(merge_streams([stream])) as merged:
            async for _, out in merged:
                if tracker is not None:
                    tracker.on_output(out)
                cached = max(cached, out.num_cached_tokens or 0)
                for c in out.outputs:
                    i = c.index
                    if done[i]:
                        continue
                    num_completion += len(c.token_ids)
                    final = c.finish_reason is not None
                    r_delta, content = reasoning[i].feed(c.text, final=final)
                    calls = []
                    if ctx.parse_tools:
                        first_call = tools[i].num_calls
                        content, calls = tools[i].feed(content, final=final)
                        # Whitespace-only content waits: it goes out before more text, and is dropped
                        # when a call comes next or ends the answer (as in a whole response).
                        if content and not content.strip():
                            pending_ws[i] += content
                            content = ""
                        elif content:
                            content, pending_ws[i] = pending_ws[i] + content, ""
                        if calls:
                            pending_ws[i] = ""
                        if final and not tools[i].num_calls and pending_ws[i]:
                            content, pending_ws[i] = content + pending_ws[i], ""
                    delta = {}
                    if r_delta:
                        delta["reasoning_content"] = r_delta
                    if content:
                        delta["content"] = content
                    if calls:
                        delta["tool_calls"] = [call.to_dict(index=first_call + k) for k, call in enumerate(calls)]
                    logprobs = None
                    if ctx.top_logprobs is not None and c.token_ids:
                        logprobs = {"content": chat_logprobs(ctx, c.token_ids, c.logprobs)}
                    finish = None
                    if final:
                        done[i] = True
                        finish = "tool_calls" if tools[i].num_calls else c.finish_reason
                        reasons[i] = finish
                    if not (delta or logprobs or finish):
                        continue
                    usage = None
                    if ctx.continuous_usage:
                        usage = _usage(ctx.num_prompt_tokens, num_completion, cached)
                    yield chunk(i, delta, finish, logprobs, _stop_reason(ctx, c.stop_reason), usage)
        if ctx.include_usage:
            yield sse({"id": ctx.request_id, "object": "chat.completion.chunk", "created": ctx.created,
                       "model": ctx.model, "choices": [], "usage": _usage(ctx.num_prompt_tokens, num_completion,
                                                                          cached)})
        if tracker is not None:
            tracker.finish(_outcome(reasons))
    except Exception as e:  # the engine failed or is shutting down: say so in the stream, then end it
        if tracker is not None:
            tracker.finish("error")
        yield sse(stream_error(e))
    yield SSE_DONE


def stream_error(e: Exception) -> dict:
    from ..engine.async_engine import EngineDeadError

    if isinstance(e, EngineDeadError):
        return error_body(str(e), "service_unavailable", code="shutting_down")
    if isinstance(e, ValueError):
        return error_body(str(e), "invalid_request_error", code="invalid_value")
    log.exception("stream failed", exc_info=e)
    return error_body(f"internal error: {type(e).__name__}", "internal_server_error", code="internal_error")


# --------------------------------------------------------------------------------------- completions
@dataclass
class CompletionPrompt:
    text: str  # the prompt as text (decoded when given as ids): what echo returns
    token_ids: list[int]


@dataclass
class CompletionContext:
    request_id: str
    model: str
    created: int
    prompts: list[CompletionPrompt]
    n: int = 1
    logprobs: int | None = None
    echo: bool = False
    include_usage: bool = False
    continuous_usage: bool = False
    token_text: TokenText | None = None
    prompt_logprobs: bool = False  # return them (non-streaming)


def completion_logprobs(ctx: CompletionContext, token_ids: list[int], entries, offset: int = 0) -> dict:
    tt = ctx.token_text
    tokens, token_lps, tops, offsets = [], [], [], []
    for tid, entry in zip(token_ids, entries):
        s = tt.text(tid, entry.get(tid) if entry else None)
        tokens.append(s)
        offsets.append(offset)
        offset += len(s)
        if entry is None:
            token_lps.append(None)
            tops.append(None)
            continue
        chosen = entry.get(tid)
        token_lps.append(_lp(chosen) if chosen is not None else _MIN_LOGPROB)
        top: dict[str, float] = {}
        for t, lp in sorted(entry.items(), key=lambda x: _rank(x[1])):
            top.setdefault(tt.text(t, lp), _lp(lp))  # two tokens with one text: the likelier one's
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def _merge_logprobs(a: dict | None, b: dict) -> dict:
    if a is None:
        return b
    return {k: a[k] + b[k] for k in a}


async def merge_streams(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """(stream index, item) from several async iterators as they come; closing this closes them all."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as s:
            async for item in s:
                yield 0, item
        return
    q: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(i: int, s) -> None:
        try:
            async for item in s:
                q.put_nowait((i, item))
        except Exception as e:
            q.put_nowait((i, e))
        finally:
            q.put_nowait((i, end))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            i, item = await q.get()
            if item is end:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


async def completion_full(streams: list[AsyncIterator], ctx: CompletionContext, trackers=None) -> dict:
    n = ctx.n
    choices = [_Choice() for _ in range(len(ctx.prompts) * n)]
    prompt_lps: list = [None] * len(ctx.prompts)
    cached = [0] * len(ctx.prompts)
    async with contextlib.aclosing(merge_streams(streams)) as merged:
        async for p, out in merged:
            if trackers:
                trackers[p].on_output(out)
            cached[p] = max(cached[p], out.num_cached_tokens or 0)
            if out.prompt_logprobs is not None and prompt_lps[p] is None:
                prompt_lps[p] = out.prompt_logprobs
            for c in out.outputs:
                choices[p * n + c.index].absorb(c)
    body_choices = []
    for k, ch in enumerate(choices):
        prompt = ctx.prompts[k // n]
        text = "".join(ch.text)
        logprobs = None
        if ctx.logprobs is not None:
            logprobs = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            if ctx.echo:
                entries = prompt_lps[k // n] or [None] * len(prompt.token_ids)
                logprobs = completion_logprobs(ctx, prompt.token_ids, entries)
            offset = len(prompt.text) if ctx.echo else 0
            logprobs = _merge_logprobs(logprobs, completion_logprobs(ctx, ch.token_ids, ch.logprobs, offset))
        body_choices.append({"index": k, "text": (prompt.text + text) if ctx.echo else text, "logprobs": logprobs,
                             "finish_reason": ch.finish_reason, "stop_reason": ch.stop_reason})
        if ctx.prompt_logprobs:
            body_choices[-1]["prompt_logprobs"] = prompt_logprobs_json(prompt_lps[k // n])
    if trackers:
        for p, t in enumerate(trackers):
            t.finish(_outcome([choices[p * n].finish_reason]))
    num_prompt = sum(len(p.token_ids) for p in ctx.prompts)
    return {"id": ctx.request_id, "object": "text_completion", "created": ctx.created, "model": ctx.model,
            "choices": body_choices,
            "usage": _usage(num_prompt, sum(len(c.token_ids) for c in choices), sum(cached))}


async def completion_stream(streams: list[AsyncIterator], ctx: CompletionContext, trackers=None
                            ) -> AsyncIterator[str]:
    n = ctx.n
    num_prompt = sum(len(p.token_ids) for p in ctx.prompts)
    num_completion = 0
    started = [False] * (len(ctx.prompts) * n)
    done = [False] * (len(ctx.prompts) * n)
    offsets = [0] * (len(ctx.prompts) * n)
    prompt_lps: list = [None] * len(ctx.prompts)
    first_reason: list[str | None] = [None] * len(ctx.prompts)

    def chunk(index: int, text: str, logprobs=None, finish=None, stop_reason=None, usage=None) -> str:
        return _sse_chunk(ctx, "text_completion", {"index": index, "text": text}, logprobs, finish, stop_reason,
                          usage)

    try:
        async with contextlib.aclosing(merge_streams(streams)) as merged:
            async for p, out in merged:
                if trackers:
                    trackers[p].on_output(out)
                if out.prompt_logprobs is not None and prompt_lps[p] is None:
                    prompt_lps[p] = out.prompt_logprobs
                prompt = ctx.prompts[p]
                for c in out.outputs:
                    k = p * n + c.index
                    if done[k]:
                        continue
                    num_completion += len(c.token_ids)
                    text = c.text
                    logprobs = None
                    if ctx.logprobs is not None:
                        logprobs = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
                    if not started[k] and ctx.echo:
                        text = prompt.text + text
                        if logprobs is not None:
                            entries = prompt_lps[p] or [None] * len(prompt.token_ids)
                            logprobs = completion_logprobs(ctx, prompt.token_ids, entries)
                            offsets[k] = len(prompt.text)
                    started[k] = True
                    if logprobs is not None:
                        lp = completion_logprobs(ctx, c.token_ids, c.logprobs or [], offsets[k])
                        offsets[k] += sum(len(s) for s in lp["tokens"])
                        logprobs = _merge_logprobs(logprobs, lp)
                    finish = c.finish_reason
                    if finish is not None:
                        done[k] = True
                        if c.index == 0:
                            first_reason[p] = finish
                    if not text and finish is None and not c.token_ids:
                        continue
                    usage = _usage(num_prompt, num_completion) if ctx.continuous_usage else None
                    yield chunk(k, text, logprobs, finish, c.stop_reason if finish else None, usage)
        if ctx.include_usage:
            yield sse({"id": ctx.request_id, "object": "text_completion", "created": ctx.created, "model": ctx.model,
                       "choices": [], "usage": _usage(num_prompt, num_completion)})
        if trackers:
            for p, t in enumerate(trackers):
                t.finish(_outcome([first_reason[p]]))
    except Exception as e:
        if trackers:
            for t in trackers:
                t.finish("error")
        yield sse(stream_error(e))
    yield SSE_DONE


def now() -> int:
    return int(time.time())
