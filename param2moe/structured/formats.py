"""Structural tags (xgrammar's JSON formats) for Param2's output (SPEC 5): tool calls, and reasoning
before a constrained answer.

A chat answer may start with free reasoning in <think>...</think>; the constraint applies after it.
Which is allowed follows from the rendered prompt (`reasoning_mode`): a prompt that leaves <think> open
needs the reasoning closed first ("enabled"), one that ends in a closed (empty) think block allows none
("disabled"), any other allows an optional block ("auto"). A tool call is
`<tool_call>{"name": NAME, "arguments": ARGS}</tool_call>` with ARGS matching the tool's parameter schema,
as the chat template writes it. Markup tokens are matched by id (`markup`: content -> id, vocab.py).
"""

from __future__ import annotations

import json

from ..parsers import THINK_CLOSE, THINK_OPEN, prompt_ends_in_reasoning
from ..server.tool_parser import TOOL_CLOSE, TOOL_OPEN
from .compiler import JSON_MAX_WHITESPACE, bounded_strings_as_patterns
from .params import StructuredOutputsParams

_GAP = {"type": "regex", "pattern": "[ \\n]{0,4}"}  # between </think> and the answer


def reasoning_mode(prompt: str) -> str:
    if prompt_ends_in_reasoning(prompt):
        return "enabled"
    return "disabled" if prompt.rstrip().endswith(THINK_CLOSE) else "auto"


def _marker(text: str, markup: dict[str, int]) -> dict:
    if text in markup:
        return {"type": "token", "token": markup[text]}
    return {"type": "const_string", "value": text}


def _json(schema, whitespace: int = JSON_MAX_WHITESPACE) -> dict:
    return {"type": "json_schema", "json_schema": bounded_strings_as_patterns(schema), "max_whitespace_cnt": whitespace}


def as_format(params: StructuredOutputsParams) -> dict:
    """A json, json_object, regex, choice or grammar constraint as a structural-tag format."""
    kind, value = params.kind, params.value()
    whitespace = 1 if params.disable_any_whitespace else JSON_MAX_WHITESPACE
    if kind == "json":
        return _json(value, whitespace)
    if kind == "json_object":
        return _json({"type": "object"}, whitespace)
    if kind == "regex":
        return {"type": "regex", "pattern": value}
    if kind == "choice":
        return {"type": "or", "elements": [{"type": "const_string", "value": c} for c in value]}
    if kind == "grammar":
        return {"type": "grammar", "grammar": value, "syntax": "ebnf" if "::=" in value else "lark"}
    return value["format"] if isinstance(value, dict) and "format" in value else value


def tool_calls_format(tools: list[dict], parallel: bool, markup: dict[str, int]) -> dict:
    """One call (or, with parallel, one or more) of any of `tools` (OpenAI's {"type": "function",
    "function": {"name", "parameters"}}); for a named tool_choice, pass that tool alone."""
    calls = []
    for t in tools:
        f = t["function"]
        calls.append({"type": "sequence", "elements": [
            _marker(TOOL_OPEN, markup),
            {"type": "const_string", "value": '{"name": ' + json.dumps(f["name"], ensure_ascii=False)
             + ', "arguments": '},
            _json(f.get("parameters") or {"type": "object"}),
            {"type": "const_string", "value": "}"},
            _marker(TOOL_CLOSE, markup)]})
    call = calls[0] if len(calls) == 1 else {"type": "or", "elements": calls}
    return {"type": "plus", "content": call} if parallel else call


def with_reasoning(fmt: dict, mode: str, markup: dict[str, int]) -> StructuredOutputsParams:
    """The constraint `fmt`, after free reasoning as `mode` allows (see the module's docstring)."""
    if mode == "disabled":
        return StructuredOutputsParams(structural_tag={"type": "structural_tag", "format": fmt})
    close = _marker(THINK_CLOSE, markup)
    free = ({"type": "any_tokens", "exclude_tokens": [close["token"]]} if close["type"] == "token"
            else {"type": "any_text", "excludes": [THINK_CLOSE]})
    think = [free, close, _GAP]
    if mode == "auto":
        think = [{"type": "optional", "content": {"type": "sequence", "elements": [_marker(THINK_OPEN, markup),
                                                                                  *think]}}]
    return StructuredOutputsParams(structural_tag={"type": "structural_tag",
                                                   "format": {"type": "sequence", "elements": [*think, fmt]}})
