"""Param2's tool calls (docs/model.md §5): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Hermes style).

`ToolCallParser` splits answer text as it streams in: text outside the tags goes on as content, a
call is returned whole once its closing tag arrives, and a partial opening tag at the end of a delta
is held back until it is complete, so no markup leaks into content. A call whose JSON does not parse
(or has no string "name") stays text, tags and all; so does a call that never closes.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from ..parsers import _partial_tag_suffix

TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON string, as OpenAI sends it
    id: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            self.id = f"call_{uuid.uuid4().hex[:24]}"

    def to_dict(self, index: int | None = None) -> dict:
        d = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        if index is not None:
            d = {"index": index, **d}
        return d


def parse_tool_call(body: str) -> ToolCall | None:
    """The call in the text between the tags, or None when it is not a well-formed call."""
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, ValueError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # arguments already given as a JSON string
        try:
            if not isinstance(json.loads(args), dict):
                return None
        except (json.JSONDecodeError, ValueError):
            return None
        return ToolCall(obj["name"], args)
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


class ToolCallParser:
    def __init__(self) -> None:
        self._buffer = ""  # held-back text: a partial opening tag, or the body of an open call
        self._in_call = False
        self.num_calls = 0

    def feed(self, delta: str, final: bool = False) -> tuple[str, list[ToolCall]]:
        """Take new answer text; return (content_delta, calls completed in it)."""
        text = self._buffer + delta
        self._buffer = ""
        content: list[str] = []
        calls: list[ToolCall] = []
        while text:
            if not self._in_call:
                i = text.find(TOOL_OPEN)
                if i < 0:
                    hold = 0 if final else _partial_tag_suffix(text, TOOL_OPEN)
                    content.append(text[: len(text) - hold])
                    self._buffer = text[len(text) - hold:]
                    break
                content.append(text[:i])
                text = text[i + len(TOOL_OPEN):]
                self._in_call = True
            else:
                j = text.find(TOOL_CLOSE)
                if j < 0:
                    if final:  # never closed: it was not a call
                        content.append(TOOL_OPEN + text)
                        self._in_call = False
                    else:
                        self._buffer = text
                    break
                body, text = text[:j], text[j + len(TOOL_CLOSE):]
                self._in_call = False
                call = parse_tool_call(body)
                if call is None:
                    content.append(TOOL_OPEN + body + TOOL_CLOSE)
                else:
                    calls.append(call)
        if final and self._in_call:  # final with an open call and nothing after it
            content.append(TOOL_OPEN + self._buffer)
            self._buffer, self._in_call = "", False
        self.num_calls += len(calls)
        return "".join(content), calls


def extract_tool_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """(content or None, calls) of a whole answer. With calls, content that is only whitespace is None."""
    content, calls = ToolCallParser().feed(text, final=True)
    if calls:
        content = content.strip() or None
    return content, calls
