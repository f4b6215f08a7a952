"""LoRA adapters through `param2moe serve` (a real server process): `--enable-lora --lora-modules name=path`,
the adapter's name as `model`, listed in /v1/models, vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter.
Oracle: the offline engine on the checkpoint with the adapter merged into its weights (greedy, float32)."""

from __future__ import annotations

import functools
import json

import httpx
import pytest
import torch
from server_harness import KEY, Server, assert_error, post

from param2moe import LLM, SamplingParams
from param2moe.lora.files import merge_adapter, random_adapter
from param2moe.writer import preset_config, write_checkpoint

PROMPT = [30 + (i * 37) % 400 for i in range(17)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-server")
    cfg = preset_config("tiny", {"num_hidden_layers": 2})
    write_checkpoint(str(root / "base"), cfg, seed=5, head_std=0.2)
    for i, kinds in enumerate((["qkv", "dense_mlp"], ["dense", "shared_experts"]), 1):
        random_adapter(str(root / f"a{i}"), cfg, kinds, r=8, seed=i)
        merge_adapter(str(root / "base"), str(root / f"a{i}"), str(root / f"a{i}-merged"))
    return root


@pytest.fixture(scope="module")
def server(files, tmp_path_factory):
    s = Server(["--model", str(files / "base"), "--served-model-name", "base", "--api-key", KEY, "--enable-lora",
                "--max-loras", "2", "--max-lora-rank", "8", "--kv-cache-memory", str(16 << 20),
                "--max-model-len", "256", "--lora-modules", f"first={files / 'a1'}"],
               tmp_path_factory.mktemp("logs") / "lora.log")
    yield s
    s.check_clean_exit()


@functools.cache
def offline(path: str) -> str:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with LLM(path, max_model_len=256, kv_cache_memory=16 << 20) as llm:
            out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 8
        return out[0].outputs[0].text
    finally:
        torch.set_num_threads(before)


def complete(server, model: str) -> httpx.Response:
    return post(server, "/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0})


def reply(r: httpx.Response) -> tuple[str, str]:
    """(the reply's model, its text)."""
    assert r.status_code == 200, r.text
    body = r.json()
    return body["model"], body["choices"][0]["text"]


def models(server) -> dict:
    r = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    return {m["id"]: m for m in r.json()["data"]}


def test_adapters_are_models(server, files):
    listed = models(server)
    assert listed["base"]["parent"] is None and listed["first"]["parent"] == "base"
    assert listed["first"]["root"] == str(files / "a1")
    assert offline(str(files / "a1-merged")) != offline(str(files / "base"))  # the adapter changes the text
    assert reply(complete(server, "first")) == ("first", offline(str(files / "a1-merged")))
    assert reply(complete(server, "base")) == ("base", offline(str(files / "base")))
    chat = post(server, "/v1/chat/completions", {"model": "first", "max_tokens": 4,
                                                 "messages": [{"role": "user", "content": "Hi"}]})
    assert chat.status_code == 200 and chat.json()["model"] == "first"
    assert_error(complete(server, "nope"), 404, "The model `nope` does not exist", "`base`, `first`")


def test_load_and_unload_at_run_time(server, files):
    r = post(server, "/v1/load_lora_adapter", {"lora_name": "second", "lora_path": str(files / "a2")})
    assert r.status_code == 200 and "second" in r.text, r.text
    assert models(server)["second"]["parent"] == "base"
    assert reply(complete(server, "second")) == ("second", offline(str(files / "a2-merged")))
    assert_error(post(server, "/v1/load_lora_adapter", {"lora_name": "second", "lora_path": str(files / "a2")}),
                 400, "already been loaded", param="lora_name")
    r = post(server, "/v1/unload_lora_adapter", {"lora_name": "second"})
    assert r.status_code == 200, r.text
    assert "second" not in models(server)
    assert_error(complete(server, "second"), 404, "does not exist")
    assert_error(post(server, "/v1/unload_lora_adapter", {"lora_name": "second"}), 404, "cannot be found")


def test_bad_adapter_is_refused_naming_the_tensor(server, files, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((files / "a1" / "adapter_config.json").read_text())
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(files / "a1" / "adapter_model.safetensors"))
    key = next(k for k in tensors if k.endswith("query_key_value.lora_B.weight"))
    tensors[key] = torch.zeros(7, 8)
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    err = assert_error(post(server, "/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": str(bad)}), 400,
                       key, "has shape [7, 8]", param="lora_path")
    assert "bad" not in models(server) and err["type"] == "invalid_request_error"
    assert reply(complete(server, "first"))[1] == offline(str(files / "a1-merged"))  # the server goes on
    cfg = json.loads((files / "a1" / "adapter_config.json").read_text())
    assert cfg["r"] == 8


def test_start_errors_are_one_line(files, tmp_path):
    import subprocess
    import sys

    from server_harness import ROOT

    def serve(*args) -> str:
        p = subprocess.run([sys.executable, "-m", "param2moe.cli", "serve", "--model", str(files / "base"), *args],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert p.returncode != 0
        return p.stderr.strip().splitlines()[-1]

    assert "--lora-modules: needs --enable-lora" in serve("--lora-modules", f"x={files / 'a1'}")
    assert "expected name=path" in serve("--enable-lora", "--lora-modules", "nopath")
    assert "no adapter_config.json" in serve("--enable-lora", "--lora-modules", f"x={tmp_path}")
