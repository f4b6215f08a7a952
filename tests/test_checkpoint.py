"""Checkpoint layout, writer and loader (docs/model.md §4): tiny checkpoints written into tmp_path,
loaded back, and compared tensor by tensor with the files; the errors a broken folder gives."""

from __future__ import annotations

import json
import math
import os
import pickle
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from param2moe.checkpoint import CheckpointError, checkpoint_layout, load_model
from param2moe.config import Param2MoEConfig
from param2moe.model import Param2MoEForCausalLM
from param2moe.model.attention import CausalAttention
from param2moe.writer import parse_overrides, preset_config, write_checkpoint


def write(path, seed=0, preset="tiny", **overrides):
    cfg = preset_config(preset, overrides)
    write_checkpoint(str(path), cfg, seed=seed)
    return cfg


def load(path, dtype=torch.float32):
    return load_model(str(path), dtype=dtype, progress=False)


def all_tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


def model_view(model, name: str) -> torch.Tensor:
    """The slice of the model's (fused, stacked) parameters that holds checkpoint tensor `name`."""
    cfg, m = model.config, model.model
    if name == "model.word_embeddings.weight":
        return m.word_embeddings.weight
    if name == "model.norm.weight":
        return m.norm.weight
    if name == "lm_head.weight":
        return model.lm_head.weight
    i, rest = _LAYER.match(name).groups()
    layer = m.layers[i]
    att, mlp = layer.attention, layer.mlp
    simple = {"input_layernorm.weight": layer.input_layernorm.weight,
              "post_attention_layernorm.weight": layer.post_attention_layernorm.weight,
              "attention.query_key_value.weight": att.query_key_value.weight,
              "attention.query_key_value.bias": att.query_key_value.bias,
              "attention.dense.weight": att.dense.weight, "attention.dense.bias": att.dense.bias}
    if rest in simple:
        return simple[rest]
    if rest == "attention.query_layernorm.weight":
        return att.query_layernorm.weight
    if rest == "attention.key_layernorm.weight":
        return att.key_layernorm.weight

    def swiglu(gate_up, down, width, which):
        return {"gate_proj": gate_up[:width], "up_proj": gate_up[width:], "down_proj": down}[which]

    if cfg.is_dense_layer(int(i)):
        which = re.fullmatch(r"mlp\.(\w+)\.weight", rest).group(1)
        return swiglu(mlp.gate_up_proj, mlp.down_proj, cfg.intermediate_size, which)
    if rest == "mlp.gate.weight":
        return mlp.gate.weight
    if rest == "mlp.gate.expert_bias":
        return mlp.gate.expert_bias
    e = re.fullmatch(r"mlp\.experts\.(\d+)\.(\w+)\.weight", rest)
    if e:
        j = int(e.group(1))
        return swiglu(mlp.w13[j], mlp.w2[j], cfg.moe_intermediate_size, e.group(2))
    s = re.fullmatch(r"mlp\.shared_experts\.(\w+)\.weight", rest)
    assert s, name
    sh = mlp.shared_experts
    return swiglu(sh.gate_up_proj, sh.down_proj, cfg.shared_expert_intermediate_size, s.group(1))


def assert_model_holds(model, tensors: dict[str, torch.Tensor], dtype):
    """Every file tensor sits in the model (router weight and bias in fp32), and nothing else is there."""
    for name, t in tensors.items():
        got = model_view(model, name)
        if name.endswith(("mlp.gate.weight", "mlp.gate.expert_bias")):
            assert got.dtype == torch.float32, name
            want = t.float()
            if name.endswith("expert_bias"):  # a constant shift changes no choice (docs/model.md §3.4)
                got, want = got - got.mean(), want - want.mean()
                torch.testing.assert_close(got, want, atol=1e-6, rtol=0, msg=name)
            else:
                assert torch.equal(got, want), name
        else:
            assert got.dtype == dtype, name
            assert torch.equal(got, t.to(dtype)), name
    n_model = sum(p.numel() for p in model.parameters())
    assert n_model == sum(t.numel() for t in tensors.values())


# ------------------------------------------------------------------------------------ layout
def test_released_model_has_17_15b_parameters():
    cfg = preset_config("param2-17b")
    layout = checkpoint_layout(cfg)
    total = sum(math.prod(s) for s in layout.values())
    assert abs(total - 17.15e9) < 0.01e9
    assert "lm_head.weight" not in layout  # tied
    assert layout["model.layers.0.attention.query_key_value.weight"] == ((32 + 2 * 8) * 64, 2048)
    assert layout["model.layers.0.mlp.gate_proj.weight"] == (9216, 2048)
    assert "model.layers.0.mlp.gate.weight" not in layout
    assert layout["model.layers.1.mlp.shared_experts.gate_proj.weight"] == (4096, 2048)
    assert layout["model.layers.20.mlp.experts.63.down_proj.weight"] == (2048, 2048)
    assert layout["model.layers.20.mlp.gate.expert_bias"] == (64,)
    assert "model.layers.21.input_layernorm.weight" not in layout
    # KV cache per token in bf16 (docs/model.md §1): layers x (k, v) x kv heads x head dim x 2 bytes
    assert cfg.num_hidden_layers * 2 * cfg.num_kv_heads * cfg.head_size * 2 == 43008
    # and the network built from that config (on the meta device) has exactly those parameters
    with torch.device("meta"):
        model = Param2MoEForCausalLM(cfg)
    assert sum(p.numel() for p in model.parameters()) == total


# ------------------------------------------------------------------------------------ round trip
def test_load_round_trips_every_tensor(tmp_path):
    cfg = write(tmp_path)
    model = load(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert set(tensors) == set(checkpoint_layout(cfg))
    assert_model_holds(model, tensors, torch.float32)
    # the fused QKV rows: q heads, then k heads, then v heads, contiguous
    w = model.model.layers["0"].attention.query_key_value.weight
    assert torch.equal(w, tensors["model.layers.0.attention.query_key_value.weight"])
    # tied head: the embedding itself, and logits use it
    assert model.lm_head is None and model.head_weight is model.model.word_embeddings.weight
    h = torch.randn(3, cfg.hidden_size)
    torch.testing.assert_close(model.compute_logits(h), h @ tensors["model.word_embeddings.weight"].T)


def test_untied_head_loads_lm_head(tmp_path):
    write(tmp_path, tie_word_embeddings=False)
    model = load(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert "lm_head.weight" in tensors
    assert_model_holds(model, tensors, torch.float32)
    assert not torch.equal(model.head_weight, model.model.word_embeddings.weight)


def test_biases_grouped_routing_and_no_shared_expert(tmp_path):
    cfg = write(tmp_path, use_qkv_bias=True, use_bias=True, num_shared_experts=0, n_group=4, topk_group=2,
                first_k_dense_replace=2, use_qk_norm=False)
    assert cfg.shared_expert_intermediate_size == 0
    model = load(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert "model.layers.0.attention.query_key_value.bias" in tensors
    assert not any("shared_experts" in n or "query_layernorm" in n for n in tensors)
    assert model.model.layers["2"].mlp.shared_experts is None
    assert_model_holds(model, tensors, torch.float32)


def test_bf16_checkpoint_keeps_router_in_fp32(tmp_path):
    write(tmp_path, torch_dtype="bfloat16")
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert tensors["model.layers.1.mlp.gate.weight"].dtype == torch.bfloat16  # stored in bf16
    assert tensors["model.layers.1.mlp.gate.expert_bias"].dtype == torch.bfloat16
    model = load(tmp_path, torch.bfloat16)
    moe = model.model.layers["1"].mlp
    assert moe.gate.weight.dtype == torch.float32 and moe.gate.expert_bias.dtype == torch.float32
    assert moe.w13.dtype == torch.bfloat16
    assert_model_holds(model, tensors, torch.bfloat16)


def test_fp32_router_in_a_bf16_checkpoint_is_kept_exactly(tmp_path):
    cfg = preset_config("tiny", {"torch_dtype": "bfloat16"})
    write_checkpoint(str(tmp_path), cfg, seed=4, router_dtype="float32")
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert tensors["model.layers.2.mlp.gate.weight"].dtype == torch.float32
    model = load(tmp_path, torch.bfloat16)
    assert torch.equal(model.model.layers["2"].mlp.gate.weight, tensors["model.layers.2.mlp.gate.weight"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_load_in_each_dtype(tmp_path, dtype):
    write(tmp_path)
    model = load(tmp_path, dtype)
    assert_model_holds(model, load_file(str(tmp_path / "model.safetensors")), dtype)
    ids = torch.tensor([1, 2, 3, 4])
    with torch.no_grad():
        logits = model.compute_logits(model(ids, torch.arange(4), CausalAttention([4])))
    assert logits.shape == (4, 512) and logits.dtype == torch.float32 and torch.isfinite(logits).all()


# ------------------------------------------------------------------------------------ sharded
def test_sharded_checkpoint_loads_like_one_file(tmp_path):
    one, sharded = tmp_path / "one", tmp_path / "sharded"
    cfg = write(one, seed=5)
    write_checkpoint(str(sharded), cfg, seed=5, shard_bytes=400_000)
    files = sorted(f for f in os.listdir(sharded) if f.endswith(".safetensors"))
    assert len(files) > 2 and not (sharded / "model.safetensors").exists()
    n = len(files)
    assert files == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(checkpoint_layout(cfg))
    for name, file in index["weight_map"].items():
        assert name in load_file(str(sharded / file)), name
    a, b = load(one), load(sharded)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb), na
    assert_model_holds(b, all_tensors(sharded), torch.float32)


def test_index_naming_a_missing_shard(tmp_path):
    write_checkpoint(str(tmp_path), preset_config("tiny"), shard_bytes=400_000)
    files = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
    os.remove(tmp_path / files[1])
    with pytest.raises(CheckpointError) as err:
        load(tmp_path)
    msg = str(err.value)
    assert files[1] in msg and "model.safetensors.index.json" in msg and "not exist" in msg


# ------------------------------------------------------------------------------------ errors
def _rewrite(path, change):
    file = str(path / "model.safetensors")
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_missing_tensor_is_named(tmp_path):
    write(tmp_path)
    name = "model.layers.2.mlp.experts.5.up_proj.weight"
    _rewrite(tmp_path, lambda t: t.pop(name))
    with pytest.raises(CheckpointError) as err:
        load(tmp_path)
    msg = str(err.value)
    assert name in msg and "missing" in msg and "model.safetensors" in msg


def test_wrong_shape_names_tensor_shapes_and_file(tmp_path):
    write(tmp_path)
    name = "model.layers.1.attention.dense.weight"
    _rewrite(tmp_path, lambda t: t.__setitem__(name, torch.zeros(128, 96)))
    with pytest.raises(CheckpointError) as err:
        load(tmp_path)
    msg = str(err.value)
    assert name in msg and "[128, 96]" in msg and "[128, 128]" in msg and "model.safetensors" in msg
    assert msg.index("[128, 96]") < msg.index("expected")  # found first, then the expected shape


def test_wrong_expert_width_is_named(tmp_path):
    write(tmp_path)
    name = "model.layers.1.mlp.experts.0.gate_proj.weight"
    _rewrite(tmp_path, lambda t: t.__setitem__(name, torch.zeros(32, 128)))
    with pytest.raises(CheckpointError, match=re.escape(name) + r".*\[32, 128\].*expected \[64, 128\]"):
        load(tmp_path)


def test_unexpected_tensor_is_named(tmp_path):
    write(tmp_path)
    name = "model.layers.0.mlp.bogus.weight"
    _rewrite(tmp_path, lambda t: t.__setitem__(name, torch.zeros(4)))
    with pytest.raises(CheckpointError) as err:
        load(tmp_path)
    msg = str(err.value)
    assert name in msg and "unexpected" in msg and "model.safetensors" in msg


class _Payload:
    """Unpickling this runs open(marker, 'w'): proof that a loader unpickled the file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_only_directory_is_refused_without_unpickling(tmp_path):
    write(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    marker = tmp_path / "unpickled"
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(CheckpointError) as err:
        load(tmp_path)
    msg = str(err.value)
    assert "pytorch_model.bin" in msg and "safetensors" in msg and "pickle" in msg
    assert not marker.exists()


def test_empty_directory_says_no_weights(tmp_path):
    write(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        load(tmp_path)


def test_mtp_layers_are_skipped(tmp_path):
    cfg = write(tmp_path, num_nextn_predict_layers=1)
    plain = load(tmp_path)
    n = cfg.num_hidden_layers

    def add_mtp(t):
        for name in list(t):
            m = _LAYER.match(name)
            if m and m.group(1) == "1":
                t[f"model.layers.{n}.{m.group(2)}"] = t[name].clone()
        t[f"model.layers.{n}.eh_proj.weight"] = torch.zeros(cfg.hidden_size, 2 * cfg.hidden_size)
        t[f"model.layers.{n}.enorm.weight"] = torch.ones(cfg.hidden_size)

    _rewrite(tmp_path, add_mtp)
    assert any(k.startswith(f"model.layers.{n}.") for k in load_file(str(tmp_path / "model.safetensors")))
    model = load(tmp_path)
    assert sorted(model.model.layers) == [str(i) for i in range(n)]
    for (na, pa), (nb, pb) in zip(plain.named_parameters(), model.named_parameters()):
        assert na == nb and torch.equal(pa, pb), na


def test_tied_checkpoint_with_a_redundant_lm_head_loads(tmp_path):
    write(tmp_path)
    _rewrite(tmp_path, lambda t: t.__setitem__("lm_head.weight", t["model.word_embeddings.weight"].clone() * 0))
    model = load(tmp_path)
    assert model.head_weight.abs().sum() > 0  # the embedding, not the (ignored) stored head


def test_shared_width_matching_the_other_rule_loads(tmp_path):
    # The file's shared expert is 2 x 64 = 128 wide; config.json says the total is 64.
    write(tmp_path, num_shared_experts=2, moe_shared_expert_intermediate_size=None)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["moe_shared_expert_intermediate_size"] = 64
    (tmp_path / "config.json").write_text(json.dumps(raw))
    model = load(tmp_path)
    assert model.model.layers["1"].mlp.shared_experts.down_proj.shape == (128, 128)


def test_shared_width_matching_neither_rule_names_both(tmp_path):
    # rules: moe_shared_expert_intermediate_size = 64, moe_intermediate_size * num_shared_experts = 192
    write(tmp_path, num_shared_experts=3, moe_shared_expert_intermediate_size=96)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["moe_shared_expert_intermediate_size"] = 64
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError) as err:
        load(tmp_path)
    msg = str(err.value)
    assert "shared_experts" in msg and "64" in msg and "192" in msg


# ------------------------------------------------------------------------------------ dummy weights
def test_dummy_weights_need_no_files():
    cfg = preset_config("tiny")
    model = load_model(None, dtype=torch.float32, config=cfg, dummy=True, progress=False)
    n = 0
    for name, p in model.named_parameters():
        assert p.device.type == "cpu" and torch.isfinite(p).all(), name
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        n += p.numel()
    assert n == sum(math.prod(s) for s in checkpoint_layout(cfg).values())
    assert model.model.layers["1"].mlp.w13.abs().sum() > 0
    ids = torch.tensor([3, 1, 4, 1, 5])
    with torch.no_grad():
        logits = model.compute_logits(model(ids, torch.arange(5), CausalAttention([5])))
    assert logits.shape == (5, cfg.vocab_size) and torch.isfinite(logits).all()
    again = load_model(None, dtype=torch.float32, config=cfg, dummy=True, progress=False)
    assert torch.equal(again.model.layers["2"].mlp.w2, model.model.layers["2"].mlp.w2)


def test_dummy_weights_in_bf16_keep_router_fp32():
    model = load_model(None, config=preset_config("tiny"), dummy=True, progress=False)
    moe = model.model.layers["1"].mlp
    assert moe.w13.dtype == torch.bfloat16 and moe.gate.weight.dtype == torch.float32


# ------------------------------------------------------------------------------------ the writer
def _files(path):
    return {f: (path / f).read_bytes() for f in sorted(os.listdir(path))}


def test_writer_is_reproducible(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write(a, seed=7)
    write(b, seed=7)
    write(c, seed=8)
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert fa == fb
    assert fa["model.safetensors"] != fc["model.safetensors"]
    assert fa["config.json"] == fc["config.json"]


def test_writer_overrides_and_config_round_trip(tmp_path):
    overrides = parse_overrides(["partial_rotary_factor=0.5", "rope_scaling={\"rope_type\": \"linear\", "
                                 "\"factor\": 2.0}", "score_function=softmax", "num_experts_per_tok=3"])
    assert overrides["partial_rotary_factor"] == 0.5 and overrides["score_function"] == "softmax"
    cfg = write(tmp_path, **overrides)
    again = Param2MoEConfig.from_pretrained(tmp_path)
    assert again == cfg
    assert again.rotary_dim == 16 and again.rope_params == {"rope_type": "linear", "factor": 2.0}
    assert again.num_experts_per_tok == 3


def test_writer_tokenizer_has_the_spec_special_ids(tmp_path):
    from param2moe.tokenizer import Tokenizer

    write(tmp_path)
    tok = Tokenizer(str(tmp_path))
    specials = {0: "<<|PAD|>>", 1: "<<|UNK|>>", 2: "<<|BOS|>>", 3: "<<|EOS|>>", 10: "<think>", 11: "</think>",
                12: "<tool_call>", 13: "</tool_call>", 14: "<tool_response>", 15: "</tool_response>",
                21: "<|im_start|>", 22: "<|im_end|>", 23: "<tools>", 24: "</tools>"}
    for i, text in specials.items():
        assert tok.token_to_id(text) == i, text
    assert tok.bos_token_id == 2 and tok.eos_token_id == 3
    assert tok.encode("<think>hi</think>", add_special_tokens=False)[0] == 10
