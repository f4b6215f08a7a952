"""Pieces the chat and completion response builders share: SSE events, token text and bytes for
logprobs, usage, the per-choice accumulator, merging several engine streams, errors inside a stream."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from .protocol import error_body

log = logging.getLogger("param2moe.server")

MIN_LOGPROB = -9999.0  # JSON has no -inf

_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse(obj) -> str:
    # JSON keeps U+0085, U+2028 and U+2029 raw; clients that split lines with str.splitlines (httpx's
    # aiter_lines, for one) would cut the event there, so they go out escaped.
    return f"data: {json.dumps(obj, ensure_ascii=False).translate(_LINE_BREAKS)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def sse_chunk(ctx, obj: str, choice: dict, logprobs, finish, stop_reason, usage) -> str:
    """One SSE event of a streamed chat or text completion (one choice)."""
    choice = {**choice, "logprobs": logprobs, "finish_reason": finish}
    if finish is not None:
        choice["stop_reason"] = stop_reason
    body = {"id": ctx.request_id, "object": obj, "created": ctx.created, "model": ctx.model, "choices": [choice]}
    if usage is not None:
        body["usage"] = usage
    return sse(body)


def stream_error(e: Exception, request_id: str) -> dict:
    """The error event that ends a stream that failed."""
    from ..engine.async_engine import EngineDeadError

    if isinstance(e, EngineDeadError):
        return error_body(str(e), "service_unavailable", code="shutting_down")
    if isinstance(e, ValueError):
        return error_body(str(e), "invalid_request_error", code="invalid_value")
    log.exception("stream of %s failed", request_id, exc_info=e)
    return error_body(f"internal error: {type(e).__name__}", "internal_server_error", code="internal_error")


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
        """The token's own bytes (from the tokenizer), else the UTF-8 of its text."""
        if token_id not in self._bytes:
            own = self.tok.token_bytes(token_id) if self.tok else None
            if own is None:
                return list(self.text(token_id, logprob).encode("utf-8"))
            self._bytes[token_id] = own
        return self._bytes[token_id]


def logprob_value(value) -> float:
    v = float(value)
    return v if v > MIN_LOGPROB else MIN_LOGPROB


def rank(lp) -> int:
    r = getattr(lp, "rank", None)
    return r if r is not None else 1


def prompt_logprobs_json(entries) -> list | None:
    """vLLM's `prompt_logprobs`: per prompt token, None (the first) or {token id: {logprob, rank, decoded_token}}."""
    if entries is None:
        return None
    return [None if e is None else {str(t): {"logprob": logprob_value(lp), "rank": getattr(lp, "rank", None),
                                             "decoded_token": getattr(lp, "decoded_token", None)}
                                    for t, lp in e.items()} for e in entries]


def usage(num_prompt: int, num_completion: int, cached: int = 0) -> dict:
    u = {"prompt_tokens": num_prompt, "completion_tokens": num_completion, "total_tokens": num_prompt + num_completion}
    if cached:
        u["prompt_tokens_details"] = {"cached_tokens": cached}
    return u


@dataclass
class ChoiceText:
    """One choice's output so far (whole responses)."""

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


def outcome(reasons: list[str | None]) -> str:
    """The metrics outcome of a request from its choices' finish reasons."""
    r = reasons[0] if reasons else None
    return r if r in ("stop", "length", "tool_calls") else "abort" if r == "abort" else "error"


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


def now() -> int:
    return int(time.time())
