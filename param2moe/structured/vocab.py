"""The vocabulary as the grammar engine sees it: each token id's bytes in decoded text.

Besides ordinary byte-level pieces:
- special tokens (BOS, EOS, <|im_end|>, reserved) and ids past the tokenizer's vocabulary (the model's
  padded rows) get no bytes: the grammar never allows them, except the stop tokens that end it;
- markup tokens (SPEC 5: <think>, </think>, <tool_call>, ... added tokens that decoded text keeps) get a
  byte that no UTF-8 text contains, so that no JSON string, regex or text rule can take them (a
  "<think>" inside a JSON answer would split it for the reasoning parser); a grammar places them by
  token id (xgrammar's {"type": "token"}), as the tool-call format does (formats.py). Pieces of bytes
  that UTF-8 never holds (C0, C1, F5-FF), which the tokenizer does not map, get that byte too.
"""

from __future__ import annotations

from ..tokenizer import Tokenizer
from .params import StructuredOutputError

MARKUP_BYTES = b"\xff"  # never part of UTF-8: no text rule takes it


def is_markup(content: str) -> bool:
    return len(content) > 2 and content.startswith("<") and content.endswith(">")


def token_bytes(tokenizer: Tokenizer, vocab_size: int) -> list[bytes]:
    """Bytes of ids 0..vocab_size-1 (vocab_size: the width of the model's logits)."""
    added = tokenizer.added_tokens()
    out = []
    for i in range(vocab_size):
        if i in added:
            content, special = added[i]
            out.append(b"" if special else MARKUP_BYTES if is_markup(content) else content.encode())
            continue
        raw = tokenizer.token_bytes(i)
        # None: no id here, or a piece of bytes that no UTF-8 text holds (C0, C1, F5-FF)
        out.append(b"" if tokenizer.id_to_token(i) is None else MARKUP_BYTES if raw is None else bytes(raw))
    if all(b in (b"", MARKUP_BYTES) for b in out):
        raise StructuredOutputError("structured_outputs: needs a tokenizer whose tokens map to bytes (byte-level "
                                    "BPE, as Param2's)")
    return out


def markup_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """content -> id of the markup tokens."""
    return {content: i for i, (content, special) in tokenizer.added_tokens().items()
            if not special and is_markup(content)}
