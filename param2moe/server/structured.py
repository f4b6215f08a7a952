"""A request's structured output: `response_format` (json_object, json_schema), vLLM's `structured_outputs`
extras (json, regex, choice, grammar, json_object, structural_tag), and for chat a `tool_choice` of
"required" or a named function (the reply is then one or more well-formed tool calls, see
structured/formats.py). In chat the constraint applies after the reasoning the prompt allows.

`structured_outputs(st, req, ...)` builds the constraint and compiles it off the event loop, so that an
invalid schema, regex or grammar (or one that does not compile in time) is a 400 naming the field before
any streaming starts; the engine then finds the grammar in the compile cache.
"""

from __future__ import annotations

import asyncio

from ..structured import StructuredOutputError, StructuredOutputsParams
from ..structured.formats import as_format, reasoning_mode, tool_calls_format, with_reasoning
from ..structured.vocab import markup_ids
from .protocol import RequestError

_FIELDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag", "disable_any_whitespace")
_IGNORED = ("disable_fallback", "disable_additional_properties", "backend")  # vLLM's; nothing to choose here


def _plain(value):
    return value.model_dump(by_alias=True, exclude_none=True) if hasattr(value, "model_dump") else value


def _from_extras(raw) -> tuple[dict, dict]:
    """(the constraint, the options) of vLLM's `structured_outputs` object."""
    raw = _plain(raw) or {}
    if not isinstance(raw, dict):
        raise RequestError("structured_outputs: expected an object", "structured_outputs")
    unknown = [k for k in raw if k not in _FIELDS and k not in _IGNORED]
    if unknown:
        raise RequestError(f"structured_outputs: unknown or unsupported field(s) {', '.join(unknown)} "
                           f"(supported: {', '.join(_FIELDS)})", "structured_outputs")
    options = {k: raw[k] for k in ("disable_any_whitespace",) if k in raw}
    return {k: v for k, v in raw.items() if k in _FIELDS and k not in options and v is not None}, options


def _from_response_format(raw) -> dict:
    fmt = _plain(raw) or {}
    kind = fmt.get("type", "text") if isinstance(fmt, dict) else None
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if schema is None:
            raise RequestError("response_format.json_schema.schema: required (the JSON schema of the reply)",
                               "response_format")
        return {"json": schema}
    raise RequestError("response_format.type: expected text, json_object or json_schema", "response_format")


def _requested(req, forced_tool: bool) -> tuple[dict, str | None]:
    """The StructuredOutputsParams fields the request asks for, and the field that asks (None: nothing)."""
    given, options = _from_extras(getattr(req, "structured_outputs", None))
    from_format = _from_response_format(getattr(req, "response_format", None))
    sources = [name for name, c in (("structured_outputs", given), ("response_format", from_format),
                                    ("tool_choice", forced_tool)) if c]
    if len(sources) > 1:
        raise RequestError(f"{sources[1]}: cannot be combined with {sources[0]} (both constrain the reply)",
                           sources[1])
    return {**(given or from_format), **options}, (sources[0] if sources else None)


def _reason(e: Exception) -> str:
    """The message of a StructuredOutputError without its "structured_outputs.<kind>: " prefix."""
    msg = str(e)
    head, _, rest = msg.partition(": ")
    return rest if rest and head.startswith("structured_outputs") else msg


async def structured_outputs(st, req, *, prompt: str | None = None, tools: list[dict] | None = None
                             ) -> StructuredOutputsParams | None:
    """The constraint of a request, compiled (and so in the engine's cache), or None. prompt: a chat's
    rendered prompt (the reasoning it allows comes first); tools: the chat's tools as tool_choice left them."""
    choice = _plain(getattr(req, "tool_choice", None))
    forced = bool(tools) and (choice == "required" or isinstance(choice, dict))
    fields, field = _requested(req, forced)
    if field is None:
        return None
    param = "tools" if forced else field
    named = param  # what an error message names: the field, and for structured_outputs its kind
    st.need_tokenizer()
    try:
        mode = reasoning_mode(prompt) if prompt is not None else "disabled"
        if forced:
            parallel = getattr(req, "parallel_tool_calls", True) is not False
            markup = markup_ids(st.tokenizer)
            so = with_reasoning(tool_calls_format(tools, parallel, markup), mode, markup)
        else:
            so = StructuredOutputsParams(**fields)
            named = f"{field}.{so.kind}" if field == "structured_outputs" else field
            if mode != "disabled":
                so = with_reasoning(as_format(so), mode, markup_ids(st.tokenizer))
        await asyncio.get_running_loop().run_in_executor(None, st.engine.structured.compile, so)
    except (StructuredOutputError, TypeError) as e:
        raise RequestError(f"{named}: {_reason(e)}", param) from None
    return so
