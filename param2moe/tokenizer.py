"""The checkpoint's tokenizer (tokenizer.json, through the `tokenizers` library) and its chat template,
rendered in a sandboxed jinja2 environment."""

from __future__ import annotations

import json
import os
from datetime import datetime
from functools import lru_cache


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
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        # Ids past the tokenizer's vocabulary (padding rows of the embedding) decode to nothing.
        ids = [i for i in ids if 0 <= i < self.vocab_size]
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    @property
    def is_byte_level(self) -> bool:
        """Whether tokens are byte-level BPE pieces (GPT-2's alphabet, see byte_decoder), as Param2's are."""
        from tokenizers import decoders

        return isinstance(self._tok.decoder, decoders.ByteLevel)

    def added_tokens(self) -> dict[int, tuple[str, bool]]:
        """id -> (content, special) of the tokens added to the vocabulary (control tokens and markup)."""
        return {i: (t.content, t.special) for i, t in self._tok.get_added_tokens_decoder().items()}

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


def _token_text(token) -> str | None:
    if isinstance(token, dict):  # {"content": "...", ...} in older tokenizer configs
        return token.get("content")
    return token


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable char that stands for each byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}
