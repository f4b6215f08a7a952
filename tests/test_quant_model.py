"""Quantized models against independent oracles (float32, CPU):
- the engine with quantization=X gives the logprobs (within 1e-4) and greedy tokens of the plain model run on a
  checkpoint whose weights were replaced by dequantize(quantize(w)), written to disk beforehand (both on the
  "torch" backend: the native CPU kernels quantize activations to int8, and are tested against their own
  oracle in tests/test_cpu_native_quant.py; here the model, loader and dispatch are checked exactly);
- a checkpoint written by `param2moe quantize` (compressed-tensors) and a DeepSeek-style fp8 one load to
  exactly the weights quantization at load makes;
- tensor parallelism (2 gloo ranks) with quantization gives the single process's results;
- dummy weights are quantized matrix by matrix, and the shared expert folds into quantized expert stacks."""

import json
import math
import os
import shutil

import pytest
import torch
from cases import preset_checkpoint
from safetensors.torch import load_file, save_file

from param2moe import LLM, SamplingParams
from param2moe.checkpoint import load_model
from param2moe.cli import main as cli_main
from param2moe.model.attention import CausalAttention
from param2moe.model.shard import Shard
from param2moe.quant import QuantizedWeight, dequantize, quantize
from param2moe.quant.formats import QuantFormatError
from param2moe.quant.loading import quantized_weights
from param2moe.quant.plan import OPTIONS, QuantPlan, int4_group, quantizable
from param2moe.writer import preset_config

HELDOUT = os.path.join(os.path.dirname(__file__), "data", "demo_heldout.txt")

# Widths that every option can cut: 128-row blocks for the qkv parts, whole int4 groups per TP rank.
CONFIG = {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "intermediate_size": 512,
          "moe_intermediate_size": 256, "moe_shared_expert_intermediate_size": 256}
PROMPTS = [list(range(30, 30 + n)) for n in (6, 19)]
PARAMS = SamplingParams(temperature=0, max_tokens=8, logprobs=1, prompt_logprobs=0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return preset_checkpoint(tmp_path_factory, "quant", CONFIG, seed=3)


def _run(path, **kw):
    llm = LLM(path, kv_cache_memory=1 << 24, **kw)
    try:
        return llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    finally:
        llm.llm_engine.shutdown()


def _largest_difference(a, b, generated: bool = True) -> float:
    """The largest |logprob difference| over prompt tokens and (generated) the tokens both generated."""
    diffs = []
    for prompt, x, y in zip(PROMPTS, a, b):
        diffs += [abs(p[t] - q[t]) for p, q, t in zip(x.prompt_logprobs[1:], y.prompt_logprobs[1:], prompt[1:])]
        if generated:
            diffs += [abs(p[t] - q[t]) for p, q, t in zip(x.outputs[0].logprobs, y.outputs[0].logprobs,
                                                              x.outputs[0].token_ids)]
    return max(diffs)


def _oracle_checkpoint(src: str, out: str, option: str) -> str:
    """src with every quantizable weight replaced by dequantize(quantize(w)): the plain model on it is the oracle."""
    shutil.copytree(src, out)
    plan = QuantPlan(option)
    weights = load_file(f"{out}/model.safetensors")
    for name, w in weights.items():
        if name.endswith(".weight") and quantizable(name.removesuffix(".weight")):
            weights[name] = dequantize(plan.quantize(w)).to(w.dtype)
    save_file(weights, f"{out}/model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def plain(checkpoint):
    return _run(checkpoint)


@pytest.mark.parametrize("option", OPTIONS)
def test_engine_matches_the_dequantized_checkpoint(checkpoint, plain, option, tmp_path):
    """The quantized model's glue (loading, slicing, dispatch) on the plain torch path: exactly the oracle."""
    got = _run(checkpoint, quantization=option, kernels="torch")
    want = _run(_oracle_checkpoint(checkpoint, str(tmp_path / "oracle"), option), kernels="torch")
    for a, b in zip(got, want):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert _largest_difference(got, want) <= 1e-4
    assert _largest_difference(got, plain, generated=False) > 1e-4  # quantization did change the model


def _perplexity(text: str, **kw) -> float:
    llm = LLM(kv_cache_memory=1 << 26, **kw)
    try:
        ids = llm.get_tokenizer().encode(text)[:600]
        out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0),
                           use_tqdm=False)[0]
    finally:
        llm.shutdown()
    logprobs = [d[t].logprob for d, t in zip(out.prompt_logprobs[1:], ids[1:])]
    return math.exp(-sum(logprobs) / len(logprobs))


@pytest.mark.parametrize("option", ["int8", "int4"])
def test_native_cpu_kernels_keep_the_demo_models_perplexity(option):
    """The default CPU path runs the native kernels, which round activations to int8 per block of 128 (as
    llama.cpp's Q8_0 dot products do): on the trained demo model (real logits; a random model's amplify
    any rounding) its perplexity stays within 1% of the weight-only oracle's (the plain torch path). int4 there
    has groups of 64 (hidden size 192), a scale per group within each block."""
    text = open(HELDOUT).read()[:4000]
    native, oracle = _perplexity(text, quantization=option), _perplexity(text, quantization=option, kernels="torch")
    assert native != oracle  # the native kernels ran (they round activations)
    assert abs(native / oracle - 1) < 0.01


@pytest.mark.parametrize("option", OPTIONS)
def test_quantized_checkpoint_loads_to_the_weights_made_at_load(checkpoint, option, tmp_path):
    out = str(tmp_path / option)
    assert cli_main(["quantize", checkpoint, out, "--method", option]) == 0
    config = json.load(open(f"{out}/config.json"))["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and "lm_head" in config["ignore"]
    online = load_model(checkpoint, torch.float32, quantization=option, progress=False)
    stored = load_model(out, torch.float32, progress=False)
    _assert_same_weights(online, stored)


def _assert_same_weights(a, b):
    qa, qb = quantized_weights(a), quantized_weights(b)
    # layer 0 (dense): qkv, dense, gate_up, down; layers 1, 2: qkv, dense, w13, w2, the shared gate_up and down
    assert [n for n, *_ in qa] == [n for n, *_ in qb] and len(qa) == 16
    for (name, _, _, x), (_, _, _, y) in zip(qa, qb):
        assert (x.method, x.shape, x.group_size, x.block) == (y.method, y.shape, y.group_size, y.block), name
        assert torch.equal(x.qweight.view(torch.uint8), y.qweight.view(torch.uint8)), name
        assert torch.equal(x.scale, y.scale), name
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), name


def test_deepseek_style_fp8_checkpoint(checkpoint, tmp_path):
    """quant_method fp8 with weight_block_size [128, 128]: fp8 `weight` and float32 `weight_scale_inv`."""
    out = tmp_path / "fp8"
    shutil.copytree(checkpoint, out)
    weights = load_file(f"{out}/model.safetensors")
    for name in list(weights):
        module = name.removesuffix(".weight")
        if module != name and quantizable(module):
            qw = quantize(weights[name], "fp8", block=True)
            weights[name], weights[module + ".weight_scale_inv"] = qw.qweight, qw.scale
    save_file(weights, f"{out}/model.safetensors", metadata={"format": "pt"})
    config = json.load(open(f"{out}/config.json"))
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [128, 128]}
    json.dump(config, open(f"{out}/config.json", "w"))
    _assert_same_weights(load_model(checkpoint, torch.float32, quantization="fp8-block", progress=False),
                         load_model(str(out), torch.float32, progress=False))


@pytest.mark.parametrize("option", ["int8"])  # a row split over ranks keeps its one scale (int4 groups: see slicing)
def test_tensor_parallel_matches_one_process(checkpoint, option):
    one = _run(checkpoint, quantization=option)
    two = _run(checkpoint, quantization=option, tensor_parallel_size=2)
    for a, b in zip(one, two):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert _largest_difference(one, two) <= 1e-4


def test_tensor_parallel_slices_must_fall_on_block_boundaries(checkpoint):
    # fp8-block under TP 2: each rank's key rows are 64, half a 128-row block
    with pytest.raises(QuantFormatError, match=r"model.layers.0: .*rows 128:192 do not start and end"):
        load_model(checkpoint, torch.float32, quantization="fp8-block", progress=False, shard=Shard(0, 2))


def test_dummy_weights_are_quantized_matrix_by_matrix():
    cfg = preset_config("tiny", CONFIG)
    model = load_model(None, torch.float32, config=cfg, dummy=True, quantization="int4", progress=False)
    found = {n for n, *_ in quantized_weights(model)}
    assert "model.layers.0.mlp.gate_up_proj" in found and "model.layers.1.mlp.w13" in found
    assert "model.layers.1.mlp.shared_experts.down_proj" in found
    assert not any("gate." in n or "embeddings" in n or "norm" in n for n in found)
    for _, _, _, qw in quantized_weights(model):
        w = dequantize(qw)
        assert 0.01 < w.std().item() < 0.03  # drawn with std 0.02, then quantized
    ids = torch.tensor([5, 6, 7])
    attn = CausalAttention([3])
    assert torch.isfinite(model.compute_logits(model(ids, torch.arange(3), attn))).all()


@pytest.mark.parametrize("option", ["int8", "int4", "fp8-block"])
def test_shared_expert_folds_into_quantized_expert_stacks(checkpoint, option):
    model = load_model(checkpoint, torch.float32, quantization=option, progress=False)
    ids, positions = torch.tensor(PROMPTS[1]), torch.arange(len(PROMPTS[1]))
    before = model.compute_logits(model(ids, positions, CausalAttention([len(ids)])))
    assert model.fold_shared_experts() == 2
    assert isinstance(model.model.layers["1"].mlp.w13, QuantizedWeight)
    after = model.compute_logits(model(ids, positions, CausalAttention([len(ids)])))
    assert torch.allclose(before, after, atol=1e-4)


def test_quantized_head_is_a_copy_of_the_tied_embedding(checkpoint):
    model = load_model(checkpoint, torch.float32, quantization="int8", quantize_head=True, progress=False)
    head = model.lm_head.weight
    assert isinstance(head, QuantizedWeight)
    assert torch.allclose(dequantize(head), model.model.word_embeddings.weight, rtol=0, atol=head.scale.max() / 2)


def test_int4_group_fits_the_input_widths():
    assert int4_group([2048, 4096, 1408]) == 128
    assert int4_group([192, 256, 512, 64, 128]) == 64  # the bundled demo model
    assert int4_group([2048, 704]) == 64  # an expert of 1408 over two ranks
    assert int4_group([48]) == 128  # nothing down to 32 divides it: the build names the layer (test_cli)


def test_int4_on_the_bundled_demo_model(tmp_path):
    """The demo's hidden size (192) is no multiple of 128: int4 takes groups of 64 there, at load and in
    `param2moe quantize`'s export, which says so in its config and loads back to the same weights."""
    from param2moe.engine.config import default_model_path
    from param2moe.quant.export import quantize_checkpoint

    demo, out = default_model_path(), str(tmp_path / "int4")
    online = load_model(demo, torch.float32, quantization="int4", progress=False)
    weights = quantized_weights(online)
    assert weights and {qw.group_size for *_, qw in weights} == {64}
    quantize_checkpoint(demo, out, "int4", progress=False)
    config = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert config["config_groups"]["group_0"]["weights"]["group_size"] == 64
    stored = quantized_weights(load_model(out, torch.float32, progress=False))
    assert [n for n, *_ in stored] == [n for n, *_ in weights]
    for (name, *_, x), (_, *_, y) in zip(weights, stored):
        assert x.group_size == y.group_size and torch.equal(x.qweight, y.qweight), name
        assert torch.equal(x.scale, y.scale), name
