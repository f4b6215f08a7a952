"""The command line fails politely: each problem with the command as given is one line naming it (no traceback),
found before the model loads where it can be; a JSONL prompts file's per-line max_tokens is honoured; --model
takes a Hugging Face Hub id (from the Hub's cache, offline here)."""

import json
import os
import socket
import subprocess
import sys

import pytest

from param2moe.cli import main
from param2moe.writer import preset_config, write_checkpoint


def _error(capsys, argv, code=1) -> str:
    """The error line (the last of stderr; a progress bar may come before it)."""
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    return err.splitlines()[-1].split("\r")[-1]


@pytest.mark.parametrize("argv, words", [
    (["--model", "/no/such/folder"], ["model folder", "/no/such/folder", "does not exist"]),
    (["--device", "cuda"] if not __import__("torch").cuda.is_available() else ["--device", "cuda:99"],
     ["device='cuda", "CUDA is not available"] if not __import__("torch").cuda.is_available() else ["cuda:99"]),
    (["--device", "gpu"], ["device='gpu'", "expected cpu, cuda or cuda:N"]),
    (["-tp", "3"], ["tensor_parallel_size=3 must divide num_attention_heads"]),
], ids=["missing-folder", "no-cuda", "bad-device", "bad-tp"])
def test_bad_engine_settings_are_one_line(capsys, argv, words):
    err = _error(capsys, ["generate", "--prompt", "hi", *argv])
    assert err.startswith("param2moe generate: error: ") and all(w in err for w in words), err


def test_a_quantization_the_model_does_not_take_is_one_line(capsys, tmp_path):
    write_checkpoint(str(tmp_path), preset_config("tiny", {"moe_intermediate_size": 48}), seed=0)
    err = _error(capsys, ["generate", "--model", str(tmp_path), "--prompt", "hi", "--quantization", "int4"])
    assert err.startswith("param2moe generate: error: model.layers.") and "int4 needs K (48)" in err, err


def test_folder_without_config(capsys, tmp_path):
    err = _error(capsys, ["generate", "--model", str(tmp_path), "--prompt", "hi"])
    assert "no config.json" in err and str(tmp_path) in err


def test_prompt_problems_are_found_before_the_model_loads(capsys, tmp_path, monkeypatch):
    import param2moe.llm

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(param2moe.llm.LLM, "from_config", no_load)
    assert "give --prompt TEXT or --prompts-file FILE" in _error(capsys, ["generate"], code=2)
    missing = tmp_path / "nope.txt"
    err = _error(capsys, ["generate", "--prompts-file", str(missing)])
    assert str(missing) in err and "No such file" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": "b", "max_token": 3}\n')
    err = _error(capsys, ["generate", "--prompts-file", str(bad)])
    assert f"{bad}:2" in err and "max_token" in err
    bad.write_text('{"prompt": "a", "max_tokens": "many"}\n')
    assert "max_tokens must be a positive integer" in _error(capsys, ["generate", "--prompts-file", str(bad)])
    err = _error(capsys, ["generate", "--prompt", "hi", "--output", str(tmp_path / "no" / "out.jsonl")])
    assert "--output" in err and "No such file" in err


def test_prompt_and_prompts_file_conflict(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--prompt", "a", "--prompts-file", "b"])
    assert e.value.code == 2 and "not allowed with argument --prompt" in capsys.readouterr().err


def test_jsonl_max_tokens_per_line(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "The river", "max_tokens": 2}\n{"prompt": "Hello"}\nplain text line\n'
                       '{"prompt": "Once", "max_tokens": 0}\n')
    err = _error(capsys, ["generate", "--prompts-file", str(prompts), "--max-tokens", "5", "--ignore-eos"])
    assert f"{prompts}:4" in err and "max_tokens must be a positive integer" in err  # refused, naming the line
    prompts.write_text('{"prompt": "The river", "max_tokens": 2}\n{"prompt": "Hello"}\nplain text line\n')
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--prompts-file", str(prompts), "--max-tokens", "5", "--ignore-eos",
                 "--temperature", "0", "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [len(r["token_ids"]) for r in rows] == [2, 5, 5]
    assert [r["prompt"] for r in rows] == ["The river", "Hello", "plain text line"]


def test_port_in_use_is_reported_before_serving(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        err = _error(capsys, ["serve", "--port", str(port)])
    assert f"127.0.0.1:{port}" in err and "in use" in err


def _cli(*argv, env=None):
    return subprocess.run([sys.executable, "-m", "param2moe.cli", *argv], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_the_command_prints_one_line_not_a_traceback(tmp_path):
    proc = _cli("generate", "--model", str(tmp_path / "missing"), "--prompt", "hi")
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"param2moe generate: error: model folder '{tmp_path / 'missing'}' does not exist"


def test_hub_id_offline(tmp_path):
    """A made-up id with HF_HUB_OFFLINE=1: one line naming the id; an id in the Hub's cache: loaded from it
    (a revision not in the cache: one line again)."""
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    proc = _cli("generate", "--model", "made-up-org/no-such-model", "--prompt", "hi", env=env)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "'made-up-org/no-such-model'" in proc.stderr and "HF_HUB_OFFLINE" in proc.stderr
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--test-org--tiny"
    write_checkpoint(str(repo / "snapshots" / commit), preset_config("tiny", {"num_hidden_layers": 2}), seed=1)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    proc = _cli("generate", "--model", "test-org/tiny", "--prompt", "hi", "--max-tokens", "3", "--ignore-eos",
                env=env)
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr[-2000:]
    proc = _cli("generate", "--model", "test-org/tiny", "--revision", "v9", "--prompt", "hi", env=env)
    assert proc.returncode == 1 and "revision 'v9'" in proc.stderr and "Traceback" not in proc.stderr
