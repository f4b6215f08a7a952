"""Model facts the server reads from the tokenizer instead of hard-coding them: the chat's end-of-turn
token (found by rendering the chat template) and the bytes of each token (a byte-level alphabet read from
the `tokenizers` library), checked against independent oracles."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from param2moe.engine.config import default_model_path
from param2moe.tokenizer import Tokenizer

BUNDLED = Path(default_model_path())  # the default model's tokenizer (byte-level BPE, Param-2's special tokens)


def gpt2_byte_alphabet() -> dict[str, int]:
    """GPT-2's bytes_to_unicode table, inverted, as published with GPT-2 (the oracle)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def test_end_of_turn_from_the_chat_template(tmp_path):
    tok = Tokenizer(str(BUNDLED))
    assert tok.end_of_turn_id == tok.token_to_id("<|im_end|>") is not None
    # a template that ends a turn in plain text has no end-of-turn token; one without a template neither
    d = tmp_path / "tok"
    shutil.copytree(BUNDLED, d, ignore=shutil.ignore_patterns("*.safetensors"))
    conf = json.loads((d / "tokenizer_config.json").read_text())
    conf["chat_template"] = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n\n{% endfor %}"
    (d / "tokenizer_config.json").write_text(json.dumps(conf))
    assert Tokenizer(str(d)).end_of_turn_id is None
    del conf["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(conf))
    assert Tokenizer(str(d)).end_of_turn_id is None


def test_token_bytes_match_gpt2_alphabet_and_utf8():
    tok = Tokenizer(str(BUNDLED))
    oracle = gpt2_byte_alphabet()
    assert tok._byte_alphabet and all(oracle[ch] == b for ch, b in tok._byte_alphabet.items())
    checked = 0
    for i in range(tok.vocab_size):
        text = tok.decode([i], skip_special_tokens=False)
        got = tok.token_bytes(i)
        if got is not None and "\ufffd" not in text:  # a whole character or more: its UTF-8
            assert bytes(got) == text.encode("utf-8"), (i, text, got)
            checked += 1
    assert checked > tok.vocab_size // 2
    # a character split over several byte tokens: their bytes join to its UTF-8
    for text in ("日本語", "Зелёный", "🙂 done"):
        ids = tok.encode(text, add_special_tokens=False)
        assert b"".join(bytes(tok.token_bytes(i)) for i in ids) == text.encode("utf-8")
