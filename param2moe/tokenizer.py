"""The checkpoint's tokenizer (tokenizer.json, through the `tokenizers` library) and its chat template,
rendered in a sandboxed jinja2 environment."""

from __future__ import annotations

import json
import os
import re
from datetime import datetime
from functools import cached_property


class Tokenizer:
    def __init__(self, path: str):
        from tokenizers import Tokenizer as HFTokenizer

        file = os.path.join(path, "tokenizer.json")
        if not os.path.exists(file):
            raise FileNotFoundError(f"no tokenizer.json in {path}")
        self._tok = HFTokenizer.from_file(file)
        conf_file = os.path.join(path, "tokenizer_config.json")
        conf = json.load(open(conf_file)) if os.path.exists(conf_file) else {}
        self.chat_template = conf.get("chat_template")
        jinja_file = os.path.join(path, "chat_template.jinja")
        if os.path.exists(jinja_file):
            with open(jinja_file) as f:
                self.chat_template = f.read()
        if isinstance(self.chat_template, list):  # [{"name": "default", "template": ...}, ...]
            by_name = {t["name"]: t["template"] for t in self.chat_template}
            self.chat_template = by_name.get("default", next(iter(by_name.values())))
        self.add_bos = bool(conf.get("add_bos_token", False))
        self.bos_token = _token_text(conf.get("bos_token"))
        self.eos_token = _token_text(conf.get("eos_token"))
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self._template = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # The `tokenizers` library holds the GIL throughout `encode` but not `encode_batch`: long texts go
        # through the latter so that other threads (a server's event loop) run meanwhile.
        if len(text) > _LONG_TEXT:
            ids = self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        else:
            ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        # Ids past the tokenizer's vocabulary (padding rows of the embedding) decode to nothing.
        ids = [i for i in ids if 0 <= i < self.vocab_size]
        if len(ids) > _LONG_TEXT // 4:  # as in encode
            return self._tok.decode_batch([ids], skip_special_tokens=skip_special_tokens)[0]
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def added_tokens(self) -> dict[int, tuple[str, bool]]:
        """id -> (content, special) of the tokens added to the vocabulary (control tokens and markup)."""
        return {i: (t.content, t.special) for i, t in self._tok.get_added_tokens_decoder().items()}

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def token_bytes(self, i: int) -> list[int] | None:
        """The bytes a token stands for (a byte-level piece may hold part of a UTF-8 character), or None
        where this tokenizer's pieces do not map to bytes one to one."""
        piece = self._tok.id_to_token(i)
        if piece is None:
            return None
        m = _BYTE_FALLBACK.fullmatch(piece)
        if m:
            return [int(m.group(1), 16)]
        alphabet = self._byte_alphabet
        if alphabet is None or not all(ch in alphabet for ch in piece):
            return None
        return [alphabet[ch] for ch in piece]

    @cached_property
    def _byte_alphabet(self) -> dict[str, int] | None:
        """char -> byte of a byte-level tokenizer (GPT-2's alphabet), read from the tokenizers library's own
        byte-level pre-tokenizer; None for other tokenizers."""
        from tokenizers import decoders, pre_tokenizers

        if not isinstance(self._tok.decoder, decoders.ByteLevel):
            return None
        level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        out: dict[str, int] = {}
        # Characters whose UTF-8 encodings hold every byte that valid UTF-8 has (all but C0, C1, F5-FF).
        probes = ([chr(c) for c in range(0x80)] + [chr(0x80 + k) for k in range(0x40)]
                  + [chr((lead & 0x1F) << 6) for lead in range(0xC2, 0xE0)]
                  + [chr(max((lead & 0x0F) << 12, 0x800)) for lead in range(0xE0, 0xF0)]
                  + [chr(max((lead & 0x07) << 18, 0x10000)) for lead in range(0xF0, 0xF5)])
        for probe in probes:
            mapped = "".join(p for p, _ in level.pre_tokenize_str(probe))
            raw = probe.encode("utf-8")
            if len(mapped) != len(raw):
                return None
            out.update(zip(mapped, raw))
        return out

    @cached_property
    def end_of_turn_id(self) -> int | None:
        """The special token the chat template closes an assistant turn with (Param2's `<|im_end|>`), found
        by rendering one; None without a template or where the turn does not end in a special token."""
        mark = "p2m-end-of-turn-probe"
        try:
            text = self.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": mark}],
                                            add_generation_prompt=False)
        except Exception:  # no template, or one that refuses this conversation
            return None
        at = text.rfind(mark)
        if at < 0:
            return None
        ids = self._tok.encode(text[at + len(mark):], add_special_tokens=False).ids
        special = self._tok.get_added_tokens_decoder()
        return ids[0] if ids and ids[0] in special and special[ids[0]].special else None

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None,
                            add_generation_prompt: bool = True, **kwargs) -> str:
        if not self.chat_template:
            raise ValueError("this checkpoint has no chat template (tokenizer_config.json chat_template "
                             "or chat_template.jinja)")
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise ValueError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.filters["tojson"] = lambda v, indent=None: json.dumps(v, ensure_ascii=False, indent=indent)
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._template = env.from_string(self.chat_template)
        return self._template.render(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)


_LONG_TEXT = 16 << 10  # characters
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _token_text(token) -> str | None:
    if isinstance(token, dict):  # {"content": "...", ...} in older tokenizer configs
        return token.get("content")
    return token
