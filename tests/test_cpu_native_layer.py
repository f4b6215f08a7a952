"""The fused CPU decode layer (param2moe/kernels/cpu/decode_layer.c, layer.py): a whole decoder layer of a decode
step in one native call, against the per-op forward (the same kernels one by one: equal results) and, with int8 /
int4 weights, against the torch path on the dequantized weights."""

from __future__ import annotations

import pytest
import torch

from param2moe import LLM, LoRARequest, SamplingParams
from param2moe.checkpoint import load_model
from param2moe.kernels import Kernels
from param2moe.kernels import cpu as native
from param2moe.kernels.cpu import layer as native_layer
from param2moe.lora.files import KINDS, merge_adapter, random_adapter
from param2moe.model.attention import PagedAttention
from param2moe.quant import dequantize, quantize
from param2moe.writer import preset_config, write_checkpoint

pytestmark = [pytest.mark.skipif(native._ops_lib() is None, reason="no C compiler (or the native kernels failed)"),
              pytest.mark.usefixtures("one_thread")]

BS, NUM_BLOCKS = 4, 72


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    """Param2's layout ("small": hidden 256, 8/2 heads of 32, 16 experts of 128, 2 shared, a dense first layer);
    the grouped router on."""
    out = tmp_path_factory.mktemp("small")
    write_checkpoint(str(out), preset_config("small", {"torch_dtype": "float32", "n_group": 4, "topk_group": 2}),
                     seed=5)
    return str(out)


def _decode_steps(model, n_seqs: int, steps: int, seed: int = 0, prompt: int = 5):
    """A prompt of `prompt` tokens per sequence (one step; prompt 1: a decode step), then `steps` decode steps (one
    token each); returns the last step's hidden states and the KV caches."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    dtype = model.model.norm.weight.dtype
    shape = (NUM_BLOCKS, BS, cfg.num_kv_heads, cfg.head_size)
    kc = [torch.zeros(shape, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
    vc = [torch.zeros(shape, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
    table = torch.arange(n_seqs * 4).reshape(n_seqs, 4)
    lens = [prompt] * n_seqs
    ids = torch.randint(0, cfg.vocab_size, (n_seqs, prompt + steps), generator=g)
    h = None
    for step in range(steps + 1):
        start = [0 if step == 0 else lens[i] - 1 for i in range(n_seqs)]
        end = [lens[i] if step == 0 else lens[i] for i in range(n_seqs)]
        toks = torch.cat([ids[i, start[i]:end[i]] for i in range(n_seqs)])
        pos = torch.cat([torch.arange(start[i], end[i]) for i in range(n_seqs)])
        slots = torch.cat([table[i, torch.arange(start[i], end[i]) // BS] * BS + torch.arange(start[i], end[i]) % BS
                           for i in range(n_seqs)])
        qsl = torch.tensor([0, *torch.tensor([e - s for s, e in zip(start, end)]).cumsum(0).tolist()])
        attn = PagedAttention(kc, vc, slots, table, torch.tensor(end), qsl, max_query_len=max(e - s for s, e in
                              zip(start, end)), max_context_len=max(end))
        with torch.no_grad():
            h = model(toks, pos, attn)
        lens = [n + 1 for n in lens]
    return h, kc, vc


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_seqs", [1, 2])
def test_fused_equals_per_op(small_ckpt, dtype, n_seqs):
    """One or two sequences (16/32-bit weights: the fused step takes up to 2 rows): the same kernels in the same
    order, so the same hidden states and caches as the per-op forward."""
    model = load_model(small_ckpt, dtype=dtype, progress=False)
    got = _decode_steps(model, n_seqs, steps=3)
    native_layer.set_layer_enabled(False)
    try:
        want = _decode_steps(model, n_seqs, steps=3)
    finally:
        native_layer.set_layer_enabled(None)
    assert torch.equal(got[0], want[0])
    assert all(torch.equal(a, b) for a, b in zip(got[1] + got[2], want[1] + want[2]))


def test_fused_runs_and_declines(small_ckpt, monkeypatch):
    """The fused step is what runs at decode (not at the prompt), and not with more rows than it takes for 16-bit
    weights or when switched off."""
    model = load_model(small_ckpt, dtype=torch.bfloat16, progress=False)
    calls = []
    real = native_layer.decode_layer

    def spy(*a, **k):
        out = real(*a, **k)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(native_layer, "decode_layer", spy)
    _decode_steps(model, 1, steps=2)
    n_layers = model.config.num_hidden_layers
    assert calls == [True] * (2 * n_layers)  # two decode steps, every layer; the prompt step never asks
    calls.clear()
    _decode_steps(model, 3, steps=1)  # three rows of bf16 weights: oneDNN's matmuls, per op
    assert calls == [False] * n_layers


def _quantize_model(model, method: str, dequantized: bool = False) -> None:
    """Every linear weight and expert stack of the model as an int8 / int4 QuantizedWeight (the router and the
    head stay as they are), in place; dequantized: as the float32 weight the quantized one stands for."""
    def put(module, name):
        q = quantize(getattr(module, name), method)
        del module._parameters[name]
        setattr(module, name, torch.nn.Parameter(dequantize(q), requires_grad=False) if dequantized else q)

    for layer in model.model.layers.values():
        att = layer.attention
        put(att.query_key_value, "weight")
        put(att.dense, "weight")
        mlp = layer.mlp if hasattr(layer.mlp, "gate_up_proj") else layer.mlp.shared_experts
        put(mlp, "gate_up_proj")
        put(mlp, "down_proj")
        if hasattr(layer.mlp, "w13"):
            put(layer.mlp, "w13")
            put(layer.mlp, "w2")


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("n_seqs", [1, 16])
def test_quantized_layer(small_ckpt, method, n_seqs):
    """int8 / int4 weights in the fused step (1 and 16 sequences: VNNI, and AMX tiles where there): equal to the
    per-op path on the same kernels; and off the torch path on the dequantized weights (Kernels("torch")) by the
    activations' int8 rounding (block max / 254 an element: ~0.6% of a product's norm, a few percent of the
    hidden state's after four layers and four steps) and the expert choices that rounding flips."""
    model = load_model(small_ckpt, dtype=torch.float32, progress=False)  # quant/ops.py: native one by one
    _quantize_model(model, method)
    got, kc, _ = _decode_steps(model, n_seqs, steps=3, prompt=1)  # decode steps only: the fused step every time
    native_layer.set_layer_enabled(False)
    try:
        per_op, kc_per_op, _ = _decode_steps(model, n_seqs, steps=3, prompt=1)
    finally:
        native_layer.set_layer_enabled(None)
    torch.testing.assert_close(got, per_op, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kc[-1], kc_per_op[-1], atol=1e-5, rtol=1e-5)
    ref_model = load_model(small_ckpt, dtype=torch.float32, progress=False, kernels=Kernels("torch"))
    _quantize_model(ref_model, method, dequantized=True)
    want, _, _ = _decode_steps(ref_model, n_seqs, steps=3, prompt=1)
    # Per sequence: a token whose router scores are near a tie may take another expert on either side (random
    # weights have many); such a row then differs wholly, so most rows, not all, are held to the rounding bound.
    rows = ((got - want).norm(dim=1) / want.norm(dim=1)).sort().values
    assert rows[len(rows) // 2] < 7e-2 and rows[(3 * len(rows) - 1) // 4] < 1e-1, rows


# ------------------------------------------------------------------------------------ where it must not run
ENGINE = dict(device="cpu", dtype="float32", max_model_len=256, kv_cache_memory=8 << 20)  # also on a CUDA machine
GREEDY = SamplingParams(temperature=0, max_tokens=8, logprobs=0)
PROMPTS = [[30 + (i * 37) % 400 for i in range(13)], [100, 200, 300, 45, 46]]  # two rows: the fused step's limit


@pytest.fixture
def fused_calls(monkeypatch):
    """[True / False per decoder layer of a CPU decode step: whether the fused step ran]."""
    calls, real = [], Kernels.decode_layer

    def spy(self, layer, h, residual, cos, sin, attn):
        out = real(self, layer, h, residual, cos, sin, attn)
        if attn.max_query_len == 1:
            calls.append(out is not None)
        return out

    monkeypatch.setattr(Kernels, "decode_layer", spy)
    return calls


def _tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def _per_op(run):
    native_layer.set_layer_enabled(False)
    try:
        return run()
    finally:
        native_layer.set_layer_enabled(None)


def test_lora_engine_takes_the_per_op_path(tmp_path, fused_calls):
    """With LoRA slots attached the fused step declines (it has no adapter deltas): an adapter on every kind of
    module gives the merged checkpoint's tokens, which the fused step computes, and the same as with the fused
    step off."""
    cfg = preset_config("tiny", {"num_hidden_layers": 2})  # a dense layer, then MoE with a shared expert
    base, folder, merged = (str(tmp_path / n) for n in ("base", "adapter", "merged"))
    write_checkpoint(base, cfg, seed=5, head_std=0.2)
    random_adapter(folder, cfg, list(KINDS), r=8, seed=1)
    merge_adapter(base, folder, merged)
    with LLM(merged, **ENGINE) as llm:
        want = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert fused_calls and all(fused_calls)  # the merged model's decode steps: the fused step, every layer
    fused_calls.clear()
    request = LoRARequest("all", 1, folder)
    with LLM(base, enable_lora=True, max_lora_rank=8, lora_routed_experts=True, **ENGINE) as llm:
        got = llm.generate(PROMPTS, GREEDY, use_tqdm=False, lora_request=request)
        off = _per_op(lambda: llm.generate(PROMPTS, GREEDY, use_tqdm=False, lora_request=request))
        plain = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert not any(fused_calls)
    assert _tokens(got) == _tokens(want) == _tokens(off)
    assert _tokens(plain) != _tokens(want)  # the adapter changes the tokens: a fused step without it would show


def test_eplb_engine_takes_the_per_op_path(tmp_path, fused_calls):
    """One rank with expert load balancing (two replica slots, rearranged every 4 steps): the MoE layers decline
    (the expert map picks replicas and counts the load), the dense layer still fuses; the same tokens and
    logprobs as with the fused step off, and as the engine without EPLB (fused)."""
    path = str(tmp_path / "ckpt")
    write_checkpoint(path, preset_config("tiny", {"num_hidden_layers": 3}), seed=1)
    eplb = dict(enable_eplb=True, num_redundant_experts=2, eplb_step_interval=4, eplb_window_size=4)
    with LLM(path, **ENGINE) as llm:
        want = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert all(fused_calls)
    fused_calls.clear()
    with LLM(path, **ENGINE, **eplb) as llm:
        got = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert True in fused_calls and False in fused_calls  # the dense first layer fuses, the MoE layers do not
    with LLM(path, **ENGINE, **eplb) as llm:
        off = _per_op(lambda: llm.generate(PROMPTS, GREEDY, use_tqdm=False))
    assert _tokens(got) == _tokens(off) == _tokens(want)
    for a, b in zip(got + off, off + want):
        for x, y, tok in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, a.outputs[0].token_ids):
            assert abs(x[tok].logprob - y[tok].logprob) <= 1e-4


def test_formats_it_does_not_take(small_ckpt):
    """fp8 weights, uniformly random routing, a folded shared expert and a bias: native_weights or the C
    description is None, so the per-op path runs."""
    from param2moe.model.native_layer import forget_native_weights

    model = load_model(small_ckpt, dtype=torch.float32, progress=False)
    moe_layer = model.model.layers["1"]
    lw = moe_layer.native_weights()
    assert native_layer._layer_struct(lw, torch.float32) is not None
    assert moe_layer.native_weights() is lw  # kept on the layer
    model.set_uniform_random_routing(True)
    model._draw_random_experts(1, torch.device("cpu"))
    assert moe_layer.native_weights() is None  # what changes while serving is read at every call
    model.set_uniform_random_routing(False)
    moe_layer.attention.lora_dense = object()
    assert moe_layer.native_weights() is None
    moe_layer.attention.lora_dense = None
    att = moe_layer.attention
    att.dense.bias = torch.nn.Parameter(torch.zeros(att.dense.weight.shape[0]), requires_grad=False)
    forget_native_weights(moe_layer)  # tensors replaced after the first call: the description is built again
    assert native_layer._layer_struct(moe_layer.native_weights(), torch.float32) is None
    att.dense.bias = None
    fp8 = quantize(att.query_key_value.weight, "fp8")
    del att.query_key_value._parameters["weight"]
    att.query_key_value.weight = fp8
    forget_native_weights(moe_layer)
    assert native_layer._layer_struct(moe_layer.native_weights(), torch.float32) is None
    assert moe_layer.mlp.fold_shared_experts() and moe_layer.native_weights() is None


def test_unsummed_expert_outputs_take_the_per_op_forward():
    """On CUDA a MoE layer hands the next layer its outputs unsummed (kernels.ExpertOutputs, a tuple with no
    .device): the fused CPU layer must decline it before looking at a device (it once raised AttributeError
    there, breaking every CUDA decode step)."""
    from param2moe.kernels import ExpertOutputs

    h = ExpertOutputs(torch.zeros(2, 4), torch.ones(1, 2), torch.zeros(1, 2, dtype=torch.int32))
    assert Kernels("auto").decode_layer(None, h, None, None, None, None) is None
