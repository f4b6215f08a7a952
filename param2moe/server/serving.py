"""Turn the engine's output stream into OpenAI responses: whole JSON bodies and SSE chunks.

The builders take any async iterator of RequestOutput deltas (the engine's, or a fake one in tests)
and know nothing of HTTP. Chat output goes through the reasoning parser (<think>...</think> to
`reasoning_content`) and, when tools are on, the tool-call parser (<tool_call>{json}</tool_call> to
`tool_calls`).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ..parsers import ReasoningParser, split_reasoning
from .response_common import (
    MIN_LOGPROB,
    SSE_DONE,
    ChoiceText,
    TokenText,
    logprob_value,
    merge_streams,
    now,
    outcome,
    prompt_logprobs_json,
    rank,
    sse,
    sse_chunk,
    stream_error,
    usage,
)
from .tool_parser import ToolCallParser, extract_tool_calls

__all__ = ["ChatContext", "CompletionContext", "CompletionPrompt", "TokenText", "chat_full", "chat_stream",
           "completion_full", "completion_stream", "now", "sse"]


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
        top = sorted(((t, lp) for t, lp in entry.items() if rank(lp) <= (ctx.top_logprobs or 0)),
                     key=lambda x: rank(x[1]))
        out.append({
            "token": tt.text(tid, chosen), "logprob": logprob_value(chosen) if chosen is not None else MIN_LOGPROB,
            "bytes": tt.bytes(tid, chosen),
            "top_logprobs": [{"token": tt.text(t, lp), "logprob": logprob_value(lp), "bytes": tt.bytes(t, lp)}
                             for t, lp in top],
        })
    return out


def _stop_reason(ctx, reason):
    return None if reason in ctx.hidden_stop_ids else reason


def _chat_message(ctx: ChatContext, text: str) -> tuple[dict, bool]:
    """(the assistant message of a whole answer, whether it calls tools)."""
    reasoning, content = split_reasoning(text, ctx.start_in_reasoning)
    calls = []
    if ctx.parse_tools:
        content, calls = extract_tool_calls(content)
    message = {"role": "assistant", "content": content, "reasoning_content": reasoning}
    if calls:  # as OpenAI: no tool_calls key on a reply that calls none
        message["tool_calls"] = [c.to_dict() for c in calls]
    return message, bool(calls)


async def chat_full(stream: AsyncIterator, ctx: ChatContext, tracker=None) -> dict:
    """The whole chat completion body."""
    choices = [ChoiceText() for _ in range(ctx.n)]
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
        message, called = _chat_message(ctx, "".join(ch.text))
        body_choices.append({
            "index": i, "message": message,
            "logprobs": ({"content": chat_logprobs(ctx, ch.token_ids, ch.logprobs)}
                         if ctx.top_logprobs is not None else None),
            "finish_reason": "tool_calls" if called else ch.finish_reason,
            "stop_reason": _stop_reason(ctx, ch.stop_reason)})
    if tracker is not None:
        tracker.finish(outcome([c["finish_reason"] for c in body_choices]))
    body = {"id": ctx.request_id, "object": "chat.completion", "created": ctx.created, "model": ctx.model,
            "choices": body_choices,
            "usage": usage(ctx.num_prompt_tokens, sum(len(c.token_ids) for c in choices), cached)}
    if ctx.prompt_logprobs:
        body["prompt_logprobs"] = prompt_logprobs_json(prompt_lps)
    return body


class _ChatChoiceStream:
    """One choice of a streamed chat: its parsers, held-back whitespace, and whether it has finished."""

    def __init__(self, ctx: ChatContext):
        self.reasoning = ReasoningParser(ctx.start_in_reasoning)
        self.tools = ToolCallParser() if ctx.parse_tools else None
        self.pending_ws = ""
        self.finish: str | None = None

    def delta(self, text: str, final: bool) -> dict:
        """The delta for new text of this choice: reasoning, content and completed tool calls."""
        reasoning, content = self.reasoning.feed(text, final=final)
        calls, first = [], 0
        if self.tools is not None:
            first = self.tools.num_calls
            content, calls = self.tools.feed(content, final=final)
            content = self._hold_whitespace(content, bool(calls), final)
        delta = {}
        if reasoning:
            delta["reasoning_content"] = reasoning
        if content:
            delta["content"] = content
        if calls:
            delta["tool_calls"] = [call.to_dict(index=first + k) for k, call in enumerate(calls)]
        return delta

    def _hold_whitespace(self, content: str, called: bool, final: bool) -> str:
        # Whitespace-only content waits: it goes out before more text, and is dropped when a call comes
        # next or ends the answer (as in a whole response).
        if content and not content.strip():
            self.pending_ws += content
            content = ""
        elif content:
            content, self.pending_ws = self.pending_ws + content, ""
        if called:
            self.pending_ws = ""
        if final and not self.tools.num_calls and self.pending_ws:
            content, self.pending_ws = content + self.pending_ws, ""
        return content

    def end(self, finish_reason: str) -> str:
        self.finish = "tool_calls" if self.tools is not None and self.tools.num_calls else finish_reason
        return self.finish


async def chat_stream(stream: AsyncIterator, ctx: ChatContext, tracker=None) -> AsyncIterator[str]:
    """SSE chunks of a chat completion, ending in `data: [DONE]`."""
    def chunk(index: int, delta: dict, finish=None, logprobs=None, stop_reason=None, use=None) -> str:
        return sse_chunk(ctx, "chat.completion.chunk", {"index": index, "delta": delta}, logprobs, finish,
                         stop_reason, use)

    states = [_ChatChoiceStream(ctx) for _ in range(ctx.n)]
    num_completion = cached = 0
    try:
        for i in range(ctx.n):
            yield chunk(i, {"role": "assistant", "content": ""})
        async with contextlib.aclosing(merge_streams([stream])) as merged:
            async for _, out in merged:
                if tracker is not None:
                    tracker.on_output(out)
                cached = max(cached, out.num_cached_tokens or 0)
                for c in out.outputs:
                    st = states[c.index]
                    if st.finish is not None:
                        continue
                    num_completion += len(c.token_ids)
                    final = c.finish_reason is not None
                    delta = st.delta(c.text, final)
                    logprobs = None
                    if ctx.top_logprobs is not None and c.token_ids:
                        logprobs = {"content": chat_logprobs(ctx, c.token_ids, c.logprobs)}
                    finish = st.end(c.finish_reason) if final else None
                    if not (delta or logprobs or finish):
                        continue
                    use = usage(ctx.num_prompt_tokens, num_completion, cached) if ctx.continuous_usage else None
                    yield chunk(c.index, delta, finish, logprobs, _stop_reason(ctx, c.stop_reason), use)
        if ctx.include_usage:
            yield sse({"id": ctx.request_id, "object": "chat.completion.chunk", "created": ctx.created,
                       "model": ctx.model, "choices": [], "usage": usage(ctx.num_prompt_tokens, num_completion,
                                                                         cached)})
        if tracker is not None:
            tracker.finish(outcome([s.finish for s in states]))
    except Exception as e:  # the engine failed or is shutting down: say so in the stream, then end it
        if tracker is not None:
            tracker.finish("error")
        yield sse(stream_error(e, ctx.request_id))
    yield SSE_DONE


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
        token_lps.append(logprob_value(chosen) if chosen is not None else MIN_LOGPROB)
        top: dict[str, float] = {}
        for t, lp in sorted(entry.items(), key=lambda x: rank(x[1])):
            top.setdefault(tt.text(t, lp), logprob_value(lp))  # two tokens with one text: the likelier one's
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def _merge_logprobs(a: dict | None, b: dict) -> dict:
    if a is None:
        return b
    return {k: a[k] + b[k] for k in a}


def _echo_logprobs(ctx: CompletionContext, prompt: CompletionPrompt, prompt_lps) -> dict:
    """The logprobs entries of an echoed prompt (None where the engine gave none)."""
    if not ctx.echo:
        return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    return completion_logprobs(ctx, prompt.token_ids, prompt_lps or [None] * len(prompt.token_ids))


async def completion_full(streams: list[AsyncIterator], ctx: CompletionContext, trackers=None) -> dict:
    n = ctx.n
    choices = [ChoiceText() for _ in range(len(ctx.prompts) * n)]
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
            offset = len(prompt.text) if ctx.echo else 0
            logprobs = _merge_logprobs(_echo_logprobs(ctx, prompt, prompt_lps[k // n]),
                                       completion_logprobs(ctx, ch.token_ids, ch.logprobs, offset))
        body_choices.append({"index": k, "text": (prompt.text + text) if ctx.echo else text, "logprobs": logprobs,
                             "finish_reason": ch.finish_reason, "stop_reason": ch.stop_reason})
        if ctx.prompt_logprobs:
            body_choices[-1]["prompt_logprobs"] = prompt_logprobs_json(prompt_lps[k // n])
    if trackers:
        for p, t in enumerate(trackers):
            t.finish(outcome([choices[p * n].finish_reason]))
    num_prompt = sum(len(p.token_ids) for p in ctx.prompts)
    return {"id": ctx.request_id, "object": "text_completion", "created": ctx.created, "model": ctx.model,
            "choices": body_choices,
            "usage": usage(num_prompt, sum(len(c.token_ids) for c in choices), sum(cached))}


@dataclass
class _CompletionChoiceStream:
    started: bool = False
    done: bool = False
    offset: int = 0  # text_offset of the next token


def _completion_delta(ctx: CompletionContext, st: _CompletionChoiceStream, prompt: CompletionPrompt, c,
                      prompt_lps) -> tuple[str, dict | None]:
    """(text, logprobs) of one streamed delta of a choice; the echoed prompt goes before its first."""
    text = c.text
    logprobs = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []} \
        if ctx.logprobs is not None else None
    if not st.started and ctx.echo:
        text = prompt.text + text
        if logprobs is not None:
            logprobs = _echo_logprobs(ctx, prompt, prompt_lps)
            st.offset = len(prompt.text)
    st.started = True
    if logprobs is not None:
        lp = completion_logprobs(ctx, c.token_ids, c.logprobs or [], st.offset)
        st.offset += sum(len(s) for s in lp["tokens"])
        logprobs = _merge_logprobs(logprobs, lp)
    return text, logprobs


async def completion_stream(streams: list[AsyncIterator], ctx: CompletionContext, trackers=None
                            ) -> AsyncIterator[str]:
    n = ctx.n
    num_prompt = sum(len(p.token_ids) for p in ctx.prompts)
    num_completion = 0
    states = [_CompletionChoiceStream() for _ in range(len(ctx.prompts) * n)]
    prompt_lps: list = [None] * len(ctx.prompts)
    first_reason: list[str | None] = [None] * len(ctx.prompts)
    try:
        async with contextlib.aclosing(merge_streams(streams)) as merged:
            async for p, out in merged:
                if trackers:
                    trackers[p].on_output(out)
                if out.prompt_logprobs is not None and prompt_lps[p] is None:
                    prompt_lps[p] = out.prompt_logprobs
                for c in out.outputs:
                    k = p * n + c.index
                    if states[k].done:
                        continue
                    num_completion += len(c.token_ids)
                    text, logprobs = _completion_delta(ctx, states[k], ctx.prompts[p], c, prompt_lps[p])
                    finish = c.finish_reason
                    if finish is not None:
                        states[k].done = True
                        if c.index == 0:
                            first_reason[p] = finish
                    if not text and finish is None and not c.token_ids:
                        continue
                    use = usage(num_prompt, num_completion) if ctx.continuous_usage else None
                    yield sse_chunk(ctx, "text_completion", {"index": k, "text": text}, logprobs, finish,
                                    c.stop_reason if finish else None, use)
        if ctx.include_usage:
            yield sse({"id": ctx.request_id, "object": "text_completion", "created": ctx.created, "model": ctx.model,
                       "choices": [], "usage": usage(num_prompt, num_completion)})
        if trackers:
            for p, t in enumerate(trackers):
                t.finish(outcome([first_reason[p]]))
    except Exception as e:
        if trackers:
            for t in trackers:
                t.finish("error")
        yield sse(stream_error(e, ctx.request_id))
    yield SSE_DONE
