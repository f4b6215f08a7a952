"""Pre-quantized checkpoints whose config or tensors do not fit fail with an error that names the tensor (or
the config key) and the fault; a quantization option that contradicts the checkpoint is refused."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from param2moe.checkpoint import load_model
from param2moe.quant.export import quantize_checkpoint
from param2moe.quant.formats import QuantFormatError
from param2moe.writer import preset_config, write_checkpoint

CONFIG = {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "intermediate_size": 512,
          "moe_intermediate_size": 256, "moe_shared_expert_intermediate_size": 256}
EXPERT = "model.layers.1.mlp.experts.3.down_proj"


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("prequant")
    write_checkpoint(str(root / "plain"), preset_config("tiny", CONFIG), seed=0)
    for option in ("int4", "fp8"):
        quantize_checkpoint(str(root / "plain"), str(root / option), option, progress=False)
    return root


def _edit(sources, tmp_path, option="int4", tensors=None, config=None) -> str:
    """A copy of the option's quantized checkpoint with tensors(dict) and config(quantization_config) edited."""
    out = tmp_path / "edited"
    shutil.copytree(sources / option, out)
    if tensors:
        weights = load_file(f"{out}/model.safetensors")
        tensors(weights)
        save_file(weights, f"{out}/model.safetensors", metadata={"format": "pt"})
    if config:
        cfg = json.load(open(f"{out}/config.json"))
        config(cfg["quantization_config"])
        json.dump(cfg, open(f"{out}/config.json", "w"))
    return str(out)


def _load(path, **kw):
    return load_model(path, torch.float32, progress=False, **kw)


def test_scale_of_the_wrong_shape(sources, tmp_path):
    def cut(w):
        w[EXPERT + ".weight_scale"] = w[EXPERT + ".weight_scale"][:, :1].contiguous()
    with pytest.raises(QuantFormatError, match=rf"{EXPERT}.weight_scale: shape \[128, 1\] does not fit a int4"):
        _load(_edit(sources, tmp_path, tensors=cut))


def test_non_finite_scale(sources, tmp_path):
    def spoil(w):
        w[EXPERT + ".weight_scale"][0, 0] = float("nan")
    with pytest.raises(QuantFormatError, match=rf"{EXPERT}.weight_scale: scales must be finite"):
        _load(_edit(sources, tmp_path, tensors=spoil))


def test_missing_scale(sources, tmp_path):
    with pytest.raises(QuantFormatError, match=rf"{EXPERT}.weight_scale is missing"):
        _load(_edit(sources, tmp_path, tensors=lambda w: w.pop(EXPERT + ".weight_scale")))


def test_packed_weight_of_the_wrong_shape(sources, tmp_path):
    def cut(w):
        w[EXPERT + ".weight_packed"] = w[EXPERT + ".weight_packed"][:, :-1].contiguous()
    with pytest.raises(QuantFormatError, match=rf"{EXPERT}.weight_packed: expected int32 \[128, 32\]"):
        _load(_edit(sources, tmp_path, tensors=cut))


def test_fp8_weight_of_the_wrong_dtype(sources, tmp_path):
    def widen(w):
        w[EXPERT + ".weight"] = w[EXPERT + ".weight"].float()
    with pytest.raises(QuantFormatError, match=rf"{EXPERT}.weight: expected torch.float8_e4m3fn"):
        _load(_edit(sources, tmp_path, option="fp8", tensors=widen))


def test_ignored_module_stored_quantized(sources, tmp_path):
    path = _edit(sources, tmp_path, config=lambda q: q["ignore"].append("re:.*experts\\.3\\..*"))
    with pytest.raises(QuantFormatError, match=r"model.layers.\d.mlp.experts.3.\w+: quantization_config lists it as "
                                               "ignored"):
        _load(path)


def test_targeted_module_stored_unquantized(sources, tmp_path):
    plain = load_file(str(sources / "plain" / "model.safetensors"))

    def unquantize(w):
        for leaf in ("weight_packed", "weight_scale", "weight_shape"):
            w.pop(f"{EXPERT}.{leaf}")
        w[EXPERT + ".weight"] = plain[EXPERT + ".weight"]
    with pytest.raises(QuantFormatError, match=rf"{EXPERT}.weight: quantization_config quantizes every Linear"):
        _load(_edit(sources, tmp_path, tensors=unquantize))


@pytest.mark.parametrize("key,value,match", [
    ("symmetric", False, "symmetric is false"),
    ("actorder", "group", "activation reordering"),
    ("num_bits", 3, "num_bits 3"),
])
def test_unsupported_schemes_are_named(sources, tmp_path, key, value, match):
    path = _edit(sources, tmp_path, config=lambda q: q["config_groups"]["group_0"]["weights"].__setitem__(key, value))
    with pytest.raises(QuantFormatError, match=rf"quantization_config.config_groups.group_0.weights.*{match}"):
        _load(path)


def test_unknown_quant_method(sources, tmp_path):
    with pytest.raises(QuantFormatError, match="quant_method 'gptq' is not supported"):
        _load(_edit(sources, tmp_path, config=lambda q: q.__setitem__("quant_method", "gptq")))


def test_option_that_contradicts_the_checkpoint(sources):
    with pytest.raises(QuantFormatError, match="pre-quantized as int4"):
        _load(str(sources / "int4"), quantization="int8")
    assert _load(str(sources / "int4"), quantization="int4") is not None


def test_unknown_option(sources):
    with pytest.raises(QuantFormatError, match="quantization='int3': expected one of int8, int4, fp8, fp8-block"):
        _load(str(sources / "plain"), quantization="int3")


def test_quantizing_a_quantized_checkpoint_is_refused(sources, tmp_path):
    with pytest.raises(QuantFormatError, match="already pre-quantized"):
        quantize_checkpoint(str(sources / "int4"), str(tmp_path / "again"), "int8", progress=False)
