"""Weights left in the checkpoint's memory-mapped files (param2moe/mapped.py): what is mapped and what is copied,
that the mapped model computes what the copied one does (the native decode kernels through their tables of piece
addresses, the torch path a matmul a piece), and the engine's setting."""

from __future__ import annotations

import pytest
import torch
from test_cpu_native_layer import _decode_steps

from param2moe import LLM, SamplingParams
from param2moe.checkpoint import load_model
from param2moe.kernels import cpu as native
from param2moe.kernels import moe
from param2moe.kernels.cpu import layer as native_layer
from param2moe.mapped import RowPieces
from param2moe.quant.formats import QuantizedWeight
from param2moe.writer import preset_config, write_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bf16_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16")
    write_checkpoint(str(out), preset_config("small", {"torch_dtype": "bfloat16"}), seed=3)
    return str(out)


def _file_view(model, name: str) -> torch.Tensor:
    """The tensor `name` as the model's mapped files hold it."""
    f = next(f for f in model.mapped_files if name in f.names())
    return f.tensor(name)


def test_what_is_mapped(bf16_ckpt):
    model = load_model(bf16_ckpt, dtype=torch.bfloat16, progress=False, mmap_weights=True)
    att, dense_mlp, moe_layer = model.model.layers["1"].attention, model.model.layers["0"].mlp, \
        model.model.layers["1"].mlp
    # one checkpoint tensor, one weight: the model's tensor is the file's memory
    for w, name in ((att.query_key_value.weight, "model.layers.1.attention.query_key_value.weight"),
                    (model.model.word_embeddings.weight, "model.word_embeddings.weight"),
                    (dense_mlp.down_proj, "model.layers.0.mlp.down_proj.weight")):
        assert w.data_ptr() == _file_view(model, name).data_ptr(), name
    # fused or stacked in the model, pieces in the checkpoint: the pieces, in order
    assert isinstance(moe_layer.w13, RowPieces) and isinstance(moe_layer.w2, RowPieces)
    assert isinstance(dense_mlp.gate_up_proj, RowPieces) and isinstance(moe_layer.shared_experts.gate_up_proj,
                                                                         RowPieces)
    cfg = model.config
    assert moe_layer.w13.shape == (cfg.num_experts, 2 * cfg.moe_intermediate_size, cfg.hidden_size)
    gate, up = moe_layer.w13.matrix(5)
    assert gate.data_ptr() == _file_view(model, "model.layers.1.mlp.experts.5.gate_proj.weight").data_ptr()
    assert up.data_ptr() == _file_view(model, "model.layers.1.mlp.experts.5.up_proj.weight").data_ptr()
    # small or converted: copied (the router is kept in float32)
    assert moe_layer.gate.weight.dtype == torch.float32
    copied = load_model(bf16_ckpt, dtype=torch.bfloat16, progress=False)
    assert not hasattr(copied, "mapped_files") and isinstance(copied.model.layers["1"].mlp.w13, torch.nn.Parameter)
    torch.testing.assert_close(moe_layer.w13.contiguous_copy(), copied.model.layers["1"].mlp.w13, rtol=0, atol=0)


def test_other_dtype_is_copied(bf16_ckpt):
    model = load_model(bf16_ckpt, dtype=torch.float32, progress=False, mmap_weights=True)
    assert not getattr(model, "mapped_files", [])
    assert isinstance(model.model.layers["1"].mlp.w13, torch.nn.Parameter)


def test_quantized_weights_are_computed_the_rest_mapped(bf16_ckpt):
    model = load_model(bf16_ckpt, dtype=torch.bfloat16, progress=False, mmap_weights=True, quantization="int8")
    assert isinstance(model.model.layers["1"].mlp.w13, QuantizedWeight)
    emb = model.model.word_embeddings.weight
    assert emb.data_ptr() == _file_view(model, "model.word_embeddings.weight").data_ptr()


@pytest.mark.parametrize("n_seqs", [1, 2])
def test_native_decode_equals_the_copied_model(bf16_ckpt, n_seqs):
    """The fused decode layer (and the per-op kernels at the prompt) on the mapped model: the same kernels on the
    same numbers as on the copied model, so the same hidden states, bit for bit."""
    mapped = load_model(bf16_ckpt, dtype=torch.bfloat16, progress=False, mmap_weights=True)
    copied = load_model(bf16_ckpt, dtype=torch.bfloat16, progress=False)
    got, want = _decode_steps(mapped, n_seqs, steps=3, prompt=1), _decode_steps(copied, n_seqs, steps=3, prompt=1)
    assert all(layer.__dict__["_p2m_native_layer"][1] is not None for layer in mapped.model.layers.values())
    assert torch.equal(got[0], want[0])
    native_layer.set_layer_enabled(False)  # the per-op native kernels: the MoE and the MLP through their tables
    try:
        per_op = _decode_steps(mapped, n_seqs, steps=3, prompt=1)
    finally:
        native_layer.set_layer_enabled(None)
    assert torch.equal(per_op[0], want[0])


def test_prompt_steps_match_the_copied_model(bf16_ckpt):
    """Prompt steps (a torch matmul a piece, where the copied model has one for gate and up): its numbers up to the
    matmuls' summation order."""
    mapped = load_model(bf16_ckpt, dtype=torch.bfloat16, progress=False, mmap_weights=True)
    copied = load_model(bf16_ckpt, dtype=torch.bfloat16, progress=False)
    got, want = _decode_steps(mapped, 3, steps=0, prompt=9), _decode_steps(copied, 3, steps=0, prompt=9)
    torch.testing.assert_close(got[0].float(), want[0].float(), atol=0.05, rtol=0.02)
    assert (got[0].float() - want[0].float()).abs().mean() < 2e-3


def test_native_moe_takes_row_pieces():
    g = torch.Generator().manual_seed(0)
    e, i, h, t, k = 6, 48, 64, 3, 2
    gates, ups, downs = ([(torch.randn(a, b, generator=g) / b ** 0.5).to(torch.bfloat16) for _ in range(e)]
                         for a, b in ((i, h), (i, h), (h, i)))
    w13, w2 = RowPieces([[gt, u] for gt, u in zip(gates, ups)], True), RowPieces([[d] for d in downs], True)
    x = torch.randn(t, h, generator=g).to(torch.bfloat16)
    ids, weights = torch.tensor([[0, 5], [2, -1], [5, 3]]), torch.rand(t, k, generator=g)
    stacked13, stacked2 = w13.contiguous_copy(), w2.contiguous_copy()
    if native._moe_lib() is not None:
        got = native.moe_decode(x, w13, w2, weights, ids)
        assert torch.equal(got, native.moe_decode(x, stacked13, stacked2, weights, ids))
    torch.testing.assert_close(moe.moe_experts_cpu(x, w13, w2, weights, ids).float(),
                               moe.moe_experts(x, stacked13, stacked2, weights, ids).float(), atol=2e-2, rtol=2e-2)
    with pytest.raises(ValueError, match="same shapes"):
        RowPieces([[gates[0], ups[0]], [gates[1]]], True)


def test_engine_maps_by_default_and_copies_when_told(bf16_ckpt):
    prompts, params = [[5, 9, 2, 7], [11, 3]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    outs = {}
    for mmap in (True, False):
        llm = LLM(bf16_ckpt, device="cpu", mmap_weights=mmap, max_model_len=64, kv_cache_memory=4 << 20)
        model = llm.llm_engine.runner.model
        assert bool(getattr(model, "mapped_files", [])) == mmap
        outs[mmap] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert outs[True] == outs[False]
