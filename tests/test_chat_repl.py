"""`param2moe chat` in a terminal (stdin piped): a reply stops at --max-tokens, else at the model's own
default (generation_config.json's max_new_tokens), else at the end of the context, on a scripted tiny
checkpoint (tests/scripted_checkpoint.py) whose replies are known token by token."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from scripted_checkpoint import write_scripted_checkpoint
from server_harness import ROOT

from param2moe.chat_repl import reply_limit
from param2moe.tokenizer import Tokenizer

# After "<|im_start|>assistant\n": one token a piece, reasoning first (shown dimmed, or indented), then an answer.
CHAIN = ["<think>", "one", " two", " three", "</think>", " four", " five", "<<|EOS|>>"]


def test_reply_limit():
    assert reply_limit(None, None, 10, 64) == 54  # the rest of the context
    assert reply_limit(None, 5, 10, 64) == 5  # the model's default
    assert reply_limit(20, 5, 10, 64) == 20  # as asked
    assert reply_limit(100, 5, 10, 64) == 54 and reply_limit(None, 100, 10, 64) == 54  # never past the context
    assert reply_limit(None, None, 64, 64) == 0


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat")
    write_scripted_checkpoint(str(d), {"reply": CHAIN}, {"reply": "\n"})
    return d


def chat(model_dir, *args: str, max_new_tokens: int | None = None) -> str:
    gen_file = os.path.join(model_dir, "generation_config.json")
    gen = json.load(open(gen_file))
    gen.pop("max_new_tokens", None)
    if max_new_tokens is not None:
        gen["max_new_tokens"] = max_new_tokens
    json.dump(gen, open(gen_file, "w"))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "param2moe.cli", "chat", "--model", str(model_dir), "--ignore-eos",
                        "--kv-cache-memory", str(8 << 20), *args], input="hi\n\n", capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_chat_reply_length_defaults(checkpoint):
    out = chat(checkpoint, max_new_tokens=3)
    assert "one two" in out and "three" not in out
    out = chat(checkpoint, "--max-tokens", "7", max_new_tokens=3)  # asked for more than the default
    assert "three" in out and "four five" in out
    tok = Tokenizer(str(checkpoint))
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "hi"}]), add_special_tokens=False)
    out = chat(checkpoint, "--max-model-len", str(len(prompt) + 2))  # no default: the context's end
    assert "one" in out and "two" not in out
