"""The engine's settings (engine/config.py): the command line generated from EngineConfig's fields keeps every
flag name the CLI has had, gives the dataclass's defaults, and a new field gets its flag for free; LLM() takes
the same names; bad values name the setting; generation_config.json is read in one place."""

import argparse
import dataclasses
import json
import logging

import pytest

from param2moe import LLM
from param2moe.cli import build_parser
from param2moe.engine.config import (
    EngineConfig,
    generation_eos_ids,
    read_generation_config,
    sampling_defaults,
    setting,
)


def _config(*argv):
    return EngineConfig.from_cli_args(build_parser().parse_args(["generate", *argv]))


def test_cli_defaults_are_the_dataclass_defaults():
    assert _config() == EngineConfig()


def test_every_existing_flag_and_alias_still_parses():
    cfg = _config("--model", "m", "--dtype", "float32", "--device", "cpu", "--max-model-len", "512",
                  "--max-num-seqs", "8", "--max-num-batched-tokens", "64", "--block-size", "32",
                  "--kv-cache-memory", "1048576", "--gpu-memory-utilization", "0.5", "--no-enable-prefix-caching",
                  "--seed", "3", "--load-format", "dummy", "--preset", "tiny", "--enforce-eager",
                  "--max-graph-tokens", "0", "--kernels", "torch", "-tp", "2", "-pp", "3", "--enable-expert-parallel",
                  "--no-async-scheduling")
    assert cfg == EngineConfig(model="m", dtype="float32", device="cpu", max_model_len=512, max_num_seqs=8,
                               max_num_batched_tokens=64, block_size=32, kv_cache_memory=1 << 20,
                               gpu_memory_utilization=0.5, enable_prefix_caching=False, seed=3, load_format="dummy",
                               preset="tiny", enforce_eager=True, max_graph_tokens=0, kernels="torch",
                               tensor_parallel_size=2, pipeline_parallel_size=3, enable_expert_parallel=True,
                               async_scheduling=False)
    long = _config("--tensor-parallel-size", "4", "--pipeline-parallel-size", "2", "--async-scheduling")
    assert (long.tensor_parallel_size, long.pipeline_parallel_size, long.async_scheduling) == (4, 2, True)


@pytest.mark.parametrize("argv", [["--kernels", "triton"], ["--dtype", "int8"], ["--max-num-seqs", "many"]])
def test_cli_refuses_bad_values(argv, capsys):
    with pytest.raises(SystemExit):
        _config(*argv)
    assert argv[0] in capsys.readouterr().err


def test_a_new_field_gets_its_flag_and_keyword():
    @dataclasses.dataclass
    class WithNewSetting(EngineConfig):
        quantization: str | None = setting(None, "weight format", choices=("int8", "fp8"))
        max_loras: int = setting(1, "adapters in one batch")

    p = argparse.ArgumentParser()
    WithNewSetting.add_cli_args(p)
    cfg = WithNewSetting.from_cli_args(p.parse_args(["--quantization", "fp8", "--max-loras", "4"]))
    assert (cfg.quantization, cfg.max_loras) == ("fp8", 4)
    assert "adapters in one batch" in p.format_help()
    with pytest.raises(ValueError, match="quantization='int4': expected one of int8, fp8"):
        WithNewSetting(quantization="int4").resolve()


def test_llm_keywords_are_the_config_fields():
    with pytest.raises(TypeError, match="unknown engine option.*max_num_seq\\b"):
        LLM(max_num_seq=4)
    with pytest.raises(ValueError, match="kernels='cuda': expected one of auto, torch"):
        LLM(kernels="cuda")


def test_config_travels_to_workers_as_json():
    cfg = EngineConfig(model="/x", tensor_parallel_size=2, async_scheduling=True, uniform_random_routing=False)
    assert EngineConfig.from_json(cfg.to_json()) == cfg


def test_generation_config_reader(tmp_path, caplog):
    assert read_generation_config(None) == {} and read_generation_config(str(tmp_path)) == {}
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.6, "top_p": None, "top_k": 20, "eos_token_id": [3, "x", 7], "max_new_tokens": 9}))
    gen = read_generation_config(str(tmp_path))
    assert sampling_defaults(gen) == {"temperature": 0.6, "top_k": 20}
    assert generation_eos_ids(gen) == [3, 7] and generation_eos_ids({"eos_token_id": 5}) == [5]
    (tmp_path / "generation_config.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="param2moe"):
        assert read_generation_config(str(tmp_path)) == {}
    assert "generation_config.json" in caplog.text


def test_kernel_backend_belongs_to_each_engine(tmp_path, monkeypatch):
    """Two engines in one process, "auto" and "torch": each runs its own backend (the CPU decode runs the
    native attention kernel, or the fused decode layer around it, under "auto" only), whichever was made last."""
    from param2moe import SamplingParams
    from param2moe.kernels import cpu as native
    from param2moe.kernels.cpu import layer as native_layer
    from param2moe.writer import preset_config, write_checkpoint

    write_checkpoint(str(tmp_path), preset_config("tiny", {"num_hidden_layers": 1}), seed=1)
    calls = []
    real = native.paged_decode
    monkeypatch.setattr(native, "paged_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    real_layer = native_layer.decode_layer
    monkeypatch.setattr(native_layer, "decode_layer", lambda *a, **k: calls.append(2) or real_layer(*a, **k))
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    with LLM(str(tmp_path), kernels="auto", kv_cache_memory=1 << 22) as auto, \
            LLM(str(tmp_path), kernels="torch", kv_cache_memory=1 << 22) as plain:
        assert auto.llm_engine.model.ops.backend == "auto" and plain.llm_engine.model.ops.backend == "torch"
        plain.generate([[5, 6, 7]], params, use_tqdm=False)
        assert not calls
        auto.generate([[5, 6, 7]], params, use_tqdm=False)
        assert calls  # decode steps asked the native kernel (it may decline: no compiler)


def test_model_name(tmp_path):
    folder = EngineConfig(model=str(tmp_path / "Param2-17B"))
    (tmp_path / "Param2-17B").mkdir()
    assert folder.resolve().model_name == "Param2-17B"
    hub = EngineConfig(model="org/name")
    hub.model_id, hub.model = "org/name", str(tmp_path / "snapshots" / "0123abc")  # what resolve() leaves
    assert hub.model_name == "org/name"
    assert EngineConfig(preset="tiny", load_format="dummy").resolve().model_name == "tiny"
