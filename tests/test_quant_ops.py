"""Quantized weights' views, joins and ops against their oracle, dequantize: slices of a QuantizedWeight are
slices of the weight it stands for, joins are joins, the torch path is the matmul on the dequantized weight,
and the device kernels plug in through quant/ops.py's interface."""

import pytest
import torch
import torch.nn.functional as F

from param2moe import kernels as ops
from param2moe.kernels import cpu as cpu_kernels
from param2moe.kernels.moe import moe_experts as moe_oracle
from param2moe.quant import dequantize, layout, quantize
from param2moe.quant import ops as qops
from param2moe.quant.convert import _pack, _unpack, to_compressed
from param2moe.quant.formats import QuantFormatError, empty

KINDS = [("int8", {}), ("int4", {}), ("fp8", {}), ("fp8", {"block": True})]
IDS = ["int8", "int4", "fp8", "fp8-block"]


def _w(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.mark.parametrize("method,kw", KINDS, ids=IDS)
def test_views_are_slices_of_the_dequantized_weight(method, kw):
    qw = quantize(_w(3, 384, 512), method, **kw)
    full = dequantize(qw)
    assert torch.equal(dequantize(qw[1]), full[1])
    assert torch.equal(dequantize(qw[1:3]), full[1:3])
    assert torch.equal(dequantize(qw[2][128:384]), full[2, 128:384])
    assert torch.equal(dequantize(qw[0][:, 256:512]), full[0, :, 256:512])
    # a view writes through to the stack it was cut from
    piece = qw[1][128:256]
    piece.copy_(quantize(torch.zeros(128, 512), method, **kw))
    assert torch.equal(dequantize(qw)[1, 128:256], torch.zeros(128, 512))
    assert torch.equal(dequantize(qw)[1, :128], full[1, :128])


@pytest.mark.parametrize("method,kw,cut", [("int4", {}, (slice(None), slice(64, 256))),
                                           ("fp8", {"block": True}, (slice(100, 300),)),
                                           ("fp8", {"block": True}, (slice(None), slice(0, 200)))],
                         ids=["int4-cols", "fp8-block-rows", "fp8-block-cols"])
def test_cuts_through_scales_are_refused(method, kw, cut):
    qw = quantize(_w(384, 512), method, **kw)
    with pytest.raises(QuantFormatError, match="boundaries"):
        qw[cut]


def test_any_row_or_column_cut_of_per_channel_weights():
    qw = quantize(_w(100, 300), "int8")
    assert torch.equal(dequantize(qw[3:77, 5:299]), dequantize(qw)[3:77, 5:299])


def test_copy_refuses_another_format():
    dest = empty((128, 256), "int8")
    with pytest.raises(QuantFormatError, match="cannot copy a int4"):
        dest.copy_(quantize(_w(128, 256), "int4"))


@pytest.mark.parametrize("method,kw", KINDS, ids=IDS)
def test_joins_dequantize_to_the_joined_weights(method, kw):
    a, b = quantize(_w(256, 256, seed=1), method, **kw), quantize(_w(128, 256, seed=2), method, **kw)
    assert torch.equal(dequantize(layout.cat([a, b], dim=-2)), torch.cat([dequantize(a), dequantize(b)]))
    s = layout.stack([a[:128], b])
    assert torch.equal(dequantize(s), torch.stack([dequantize(a)[:128], dequantize(b)]))
    assert torch.equal(dequantize(layout.cat([s, s[:1]], dim=0)), torch.cat([dequantize(s), dequantize(s)[:1]]))
    with pytest.raises(QuantFormatError):
        layout.cat([a, dequantize(b)], dim=-2)


def test_compressed_tensors_packing_order():
    # compressed-tensors: value i of a word at bits 4i, stored as q + 8 (int4) / q + 128 (int8), along K.
    codes = torch.arange(16).reshape(2, 8)  # q + 8 for q = -8..7
    assert _pack(codes, 4).tolist() == [[0x76543210], [0xFEDCBA98 - (1 << 32)]]
    assert _pack(torch.tensor([[1, 2, 3, 255]]), 8).tolist() == [[0xFF030201 - (1 << 32)]]
    qw = quantize(_w(64, 256), "int4")
    packed = to_compressed(qw)["weight_packed"]
    assert packed.dtype == torch.int32 and tuple(packed.shape) == (64, 32)
    assert torch.equal(_unpack(packed, 4, 64, 256, "w"), qw.qweight)
    q8 = quantize(_w(64, 256), "int8")
    assert torch.equal(_unpack(to_compressed(q8)["weight_packed"], 8, 64, 256, "w"), q8.qweight)


@pytest.mark.parametrize("method,kw", KINDS, ids=IDS)
def test_torch_linear_in_row_slices_equals_one_matmul(method, kw, monkeypatch):
    qw = quantize(_w(640, 256), method, **kw)
    x, bias = _w(5, 256, seed=3), _w(640, seed=4)
    whole = qops.torch_linear(x, qw, bias)
    assert torch.allclose(whole, F.linear(x, dequantize(qw), bias), atol=1e-6)
    monkeypatch.setattr(qops, "_CHUNK", 128 * 256)  # 128 rows at a time
    assert torch.allclose(qops.torch_linear(x, qw, bias), whole, atol=1e-6)


@pytest.mark.parametrize("method,kw", KINDS, ids=IDS)
def test_torch_moe_experts_equals_the_oracle_on_dequantized_weights(method, kw):
    e, h, w, t, k = 6, 128, 256, 7, 2
    w13, w2 = quantize(_w(e, 2 * w, h, seed=5), method, **kw), quantize(_w(e, h, w, seed=6), method, **kw)
    x = _w(t, h, seed=7) * 20
    g = torch.Generator().manual_seed(8)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    ids[0, 1] = -1  # no expert (expert parallelism)
    weights = torch.rand(t, k, generator=g)
    want = moe_oracle(x, dequantize(w13), dequantize(w2), weights, ids)
    got = qops.torch_moe_experts(x, w13, w2, weights, ids)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    # the capture-safe form (every expert on every token) gives the same sum
    assert torch.allclose(qops.torch_moe_experts(x, w13, w2, weights, ids, every_expert=True), want, atol=1e-5)


def test_cpu_kernels_plug_in_through_the_interface(monkeypatch):
    qw = quantize(_w(128, 256), "int4")
    x = _w(3, 256, seed=1)
    calls = []

    def declines(x, qw, bias, out_dtype=None):
        calls.append("declined")
        return None

    monkeypatch.setattr(cpu_kernels, "quant_linear", declines, raising=False)
    assert torch.allclose(ops.linear(x, qw), F.linear(x, dequantize(qw)), atol=1e-6)  # the torch path
    sentinel = torch.full((3, 128), 7.0)
    monkeypatch.setattr(cpu_kernels, "quant_linear", lambda x, qw, bias, out_dtype=None: sentinel, raising=False)
    assert ops.linear(x, qw) is sentinel
    monkeypatch.setattr(cpu_kernels, "quant_moe", lambda *a: sentinel, raising=False)
    w13, w2 = quantize(_w(2, 256, 128), "int4"), quantize(_w(2, 128, 128), "int4")
    assert ops.moe_experts(x[:, :128], w13, w2, torch.ones(3, 1), torch.zeros(3, 1, dtype=torch.long)) is sentinel
    assert ops.Kernels("torch").linear(x, qw) is not sentinel  # the plain torch path: no kernel asked
    assert calls == ["declined"]


@pytest.mark.parametrize("method,kw", KINDS, ids=IDS)
def test_quantizing_in_row_slices_is_bit_identical(method, kw):
    w = _w(300, 256) * torch.linspace(0.1, 3, 300)[:, None]  # rows of different magnitudes
    whole, rows = quantize(w, method, **kw), layout.quantize_in_rows(w, method, **kw)
    assert torch.equal(whole.qweight.view(torch.uint8), rows.qweight.view(torch.uint8))
    assert torch.equal(whole.scale, rows.scale) and whole.shape == rows.shape


def test_triton_kernels_plug_in_through_the_interface(monkeypatch):
    """The glue's calls into kernels/triton/quant.py (its out_dtype, unsummed, num_appended), run by Triton's
    interpreter on the CPU where there is no GPU: the dispatch is told CPU tensors are its (as CUDA ones are)."""
    pytest.importorskip("triton")
    from test_triton_kernels import DEV

    from param2moe.kernels.triton import quant as tq

    monkeypatch.setattr(qops, "_triton", lambda x, qw, native: tq if native and tq.usable(x, qw) else None)
    monkeypatch.setattr(qops, "_triton_moe", lambda x, w13, w2, native: tq if tq.moe_usable(x, w13, w2) else None)
    kernels, plain = ops.Kernels("auto"), ops.Kernels("torch")
    x = _w(2, 128, seed=1).to(DEV) * 20
    head = quantize(_w(96, 128, seed=2), "int8").to(DEV)
    assert torch.allclose(kernels.linear(x, head), plain.linear(x, head), atol=1e-4)
    got = kernels.logits(x, head)
    assert got.dtype == torch.float32 and torch.allclose(got, plain.logits(x, head), atol=1e-4)
    e, h, w = 4, 128, 128
    w13, w2 = quantize(_w(e, 2 * w, h, seed=3), "int4").to(DEV), quantize(_w(e, h, w, seed=4), "int4").to(DEV)
    for t in (1, 3):  # the one-token GEMVs (the shared expert's column first: num_appended) and the tiles
        ids = torch.tensor([[0, 2, 3]] * t, device=DEV)  # expert 3 every token: a folded shared expert
        weights = torch.tensor([[0.7, 0.3, 1.0]] * t, device=DEV)
        xt = x[:1].expand(t, -1).contiguous()
        want = plain.moe_experts(xt, w13, w2, weights, ids)
        assert torch.allclose(kernels.moe_experts(xt, w13, w2, weights, ids, num_appended=1), want, atol=1e-4)
        pairs = kernels.moe_experts(xt, w13, w2, weights, ids, unsummed=True, num_appended=1)
        assert isinstance(pairs, ops.ExpertOutputs)
        assert torch.allclose(ops.sum_experts(pairs), want, atol=1e-4)
