"""Constraints compiled into xgrammar grammars for one tokenizer, each within a time limit.

xgrammar keeps compiled grammars in its own cache (keyed by the constraint); compiles in flight are
shared by requests that ask for the same constraint. A compile runs on a worker thread (xgrammar
releases the GIL), so the caller waits at most `timeout` seconds; one that takes longer fails its
request alone (it finishes in the background and lands in the cache).
"""

from __future__ import annotations

import json
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from .params import StructuredOutputError, StructuredOutputsParams
from .vocab import token_bytes

_CACHE_BYTES = 512 << 20
# Consecutive whitespace characters a JSON answer may have between its tokens: enough to indent, and an
# end to the whitespace runs that models fall into (each would otherwise run to max_tokens).
JSON_MAX_WHITESPACE = 32
_NATIVE_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")  # "[02:08:53] /project/cpp/x.cc:94: " before the reason


def import_xgrammar():
    try:
        import xgrammar
    except ImportError:
        raise StructuredOutputError("structured_outputs: needs xgrammar (pip install 'param2moe[structured]')") \
            from None
    return xgrammar


def bounded_strings_as_patterns(schema):
    """A copy of the schema whose length-bounded strings are written as patterns: xgrammar's own
    minLength/maxLength rule lets raw control characters into the string, which JSON forbids
    (mlc-ai/xgrammar#800); its pattern rule keeps the string valid JSON."""
    if isinstance(schema, list):
        return [bounded_strings_as_patterns(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (v if k in ("enum", "const", "default", "examples") else bounded_strings_as_patterns(v))
           for k, v in schema.items()}
    bounded = "minLength" in out or "maxLength" in out
    if out.get("type") == "string" and bounded and not ({"pattern", "format", "enum", "const"} & out.keys()):
        lo, hi = out.pop("minLength", 0), out.pop("maxLength", "")
        out["pattern"] = f"^[\\s\\S]{{{lo},{hi}}}$"
    return out


def choice_grammar(choices: list[str]) -> str:
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _whitespace(params: StructuredOutputsParams) -> dict:
    if params.disable_any_whitespace:
        return {"any_whitespace": False}
    return {"any_whitespace": True, "max_whitespace_cnt": JSON_MAX_WHITESPACE}


class GrammarCompiler:
    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int], timeout: float):
        xgr = self.xgr = import_xgrammar()
        self.info = xgr.TokenizerInfo(token_bytes(tokenizer, vocab_size), xgr.VocabType.RAW, vocab_size=vocab_size,
                                      stop_token_ids=list(stop_token_ids) or None)
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=2, cache_limit_bytes=_CACHE_BYTES)
        self.timeout = timeout
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="grammar")
        self._inflight: dict[str, Future] = {}
        self._lock = threading.Lock()

    def compile(self, params: StructuredOutputsParams):
        """The compiled grammar (xgrammar's CompiledGrammar); StructuredOutputError naming the field when the
        constraint is invalid or does not compile in time."""
        key = params.key()
        with self._lock:
            future = self._inflight.get(key)
            fresh = future is None
            if fresh:
                future = self._inflight[key] = self._pool.submit(self._compile, params)
        if fresh:  # outside the lock: a future already done (a cached grammar) runs the callback here, at once
            future.add_done_callback(lambda _: self._forget(key))
        try:
            return future.result(timeout=self.timeout)
        except FutureTimeout:
            raise StructuredOutputError(
                f"structured_outputs.{params.kind}: the grammar did not compile within {self.timeout:g} s "
                "(too large or too complex)") from None

    def _forget(self, key: str) -> None:
        with self._lock:
            self._inflight.pop(key, None)

    def _compile(self, params: StructuredOutputsParams):
        kind, value, c = params.kind, params.value(), self._compiler
        try:
            if kind == "json":
                return c.compile_json_schema(json.dumps(bounded_strings_as_patterns(value)), **_whitespace(params))
            if kind == "json_object":
                return c.compile_json_schema('{"type": "object"}', strict_mode=False, **_whitespace(params))
            if kind == "regex":
                return c.compile_regex(value)
            if kind == "choice":
                return c.compile_grammar(choice_grammar(value))
            if kind == "grammar":
                return c.compile_grammar(value) if "::=" in value else c.compile_lark(value)
            return c.compile_structural_tag(json.dumps(value))
        except Exception as e:  # xgrammar's RuntimeError, or pydantic's for a structural tag
            reason = _NATIVE_PREFIX.sub("", str(e).strip()).strip() or type(e).__name__
            raise StructuredOutputError(f"structured_outputs.{kind}: {reason}") from None

    def matcher(self, compiled, stop_token_ids: list[int]):
        return self.xgr.GrammarMatcher(compiled, override_stop_tokens=list(stop_token_ids) or None)
