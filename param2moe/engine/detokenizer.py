"""Incremental detokenization that never emits half a UTF-8 character, and stop-string search."""

from __future__ import annotations


class IncrementalDetokenizer:
    """Decodes a growing list of token ids a few tokens at a time.

    Byte-level BPE tokens may hold part of a character; decoding them alone gives U+FFFD. Text is
    only emitted once the window decodes cleanly, so every emitted piece is final.
    """

    def __init__(self, tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids = list(prompt_ids[-6:])  # a little context: some tokenizers decode a token by its neighbours
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        full = self.tokenizer.decode(self.ids[self.prefix_offset:], self.skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix):]
        return ""


def find_stop(text: str, new_len: int, stops: list[str]) -> tuple[int, str] | None:
    """The earliest stop string that ends inside the last new_len chars of text: (start, string)."""
    best = None
    for stop in stops:
        i = text.find(stop, max(0, len(text) - new_len - len(stop) + 1))
        if i != -1 and (best is None or i < best[0]):
            best = (i, stop)
    return best
