"""Param2's output format (docs/model.md §5): reasoning inside <think>...</think>, the answer after it.

`ReasoningParser` splits text as it streams in; a tag cut across two deltas is held back until it
is complete. An unclosed <think> runs to the end. If the prompt itself ends inside <think> (a
template that opens it), the parser starts in reasoning.
"""

from __future__ import annotations

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def _partial_tag_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ReasoningParser:
    def __init__(self, start_in_reasoning: bool = False):
        self.in_reasoning = start_in_reasoning
        self._buffer = ""

    def feed(self, delta: str, final: bool = False) -> tuple[str, str]:
        """Take new text; return (reasoning_delta, content_delta)."""
        text = self._buffer + delta
        self._buffer = ""
        reasoning, content = [], []
        while text:
            out = reasoning if self.in_reasoning else content
            tag = THINK_CLOSE if self.in_reasoning else THINK_OPEN
            i = text.find(tag)
            if i < 0:
                hold = 0 if final else _partial_tag_suffix(text, tag)
                out.append(text[: len(text) - hold])
                self._buffer = text[len(text) - hold:]
                break
            out.append(text[:i])
            text = text[i + len(tag):]
            self.in_reasoning = not self.in_reasoning
        return "".join(reasoning), "".join(content)


def split_reasoning(text: str, start_in_reasoning: bool = False) -> tuple[str | None, str]:
    """(reasoning or None, content) of a whole response."""
    parser = ReasoningParser(start_in_reasoning)
    r, c = parser.feed(text, final=True)
    return (r if r or THINK_OPEN in text or THINK_CLOSE in text or start_in_reasoning else None), c


def prompt_ends_in_reasoning(prompt: str) -> bool:
    """True when the prompt leaves a <think> open (the template opened it): the output starts in reasoning."""
    return prompt.rfind(THINK_OPEN) > prompt.rfind(THINK_CLOSE)
