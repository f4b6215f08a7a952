"""StructuredOutputsParams: what a request's output must match (shaped like vLLM's).

Exactly one constraint: a JSON schema (`json`), any JSON object (`json_object`), a regular expression
(`regex`), one of a list of strings (`choice`), a grammar (`grammar`: EBNF/GBNF with `::=` rules, else
Lark), or an xgrammar structural tag (`structural_tag`, which the server uses for tool calls and for
reasoning before the constrained part). Checked here for shape only; the grammar engine compiles it
(structured/compiler.py) and names what it cannot compile.
"""

from __future__ import annotations

import json as _json
from dataclasses import dataclass

KINDS = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")


class StructuredOutputError(ValueError):
    """A constraint that cannot be used: the message starts with the field it is about."""


@dataclass
class StructuredOutputsParams:
    json: str | dict | None = None  # a JSON schema (as a dict, or its JSON text)
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | dict | None = None
    disable_any_whitespace: bool = False  # JSON with no whitespace between its tokens

    def __post_init__(self) -> None:
        self.validate()

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    def validate(self) -> None:
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise StructuredOutputError(
                f"structured_outputs: give exactly one of {', '.join(KINDS)} (got {', '.join(given) or 'none'})")
        for name in ("json", "structural_tag"):
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    value = _json.loads(value)
                except ValueError as e:
                    raise StructuredOutputError(f"structured_outputs.{name}: not valid JSON ({e})") from None
            if value is not None and not isinstance(value, (dict, bool) if name == "json" else dict):
                raise StructuredOutputError(f"structured_outputs.{name}: expected a JSON object")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise StructuredOutputError(f"structured_outputs.{name}: expected a non-empty string")
        if self.choice is not None and (not isinstance(self.choice, (list, tuple)) or not self.choice
                                        or not all(isinstance(c, str) and c for c in self.choice)):
            raise StructuredOutputError("structured_outputs.choice: expected a non-empty list of non-empty strings")
        if self.json_object not in (None, True, False):
            raise StructuredOutputError("structured_outputs.json_object: expected true")

    def value(self):
        """The constraint itself; JSON text given for json or structural_tag comes back parsed."""
        v = getattr(self, self.kind)
        return _json.loads(v) if self.kind in ("json", "structural_tag") and isinstance(v, str) else v

    def key(self) -> str:
        """One string per distinct constraint (the compile cache's key)."""
        return _json.dumps([self.kind, self.value(), self.disable_any_whitespace], sort_keys=True)
