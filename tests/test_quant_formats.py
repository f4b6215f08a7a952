"""The quantized weight format: round trips within each method's step, packing, and errors that name the tensor."""

import pytest
import torch

from param2moe.quant import dequantize, quantize
from param2moe.quant.formats import QuantFormatError, QuantizedWeight


@pytest.mark.parametrize("method,kw", [("int8", {}), ("int4", {}), ("fp8", {}), ("fp8", {"block": True})])
def test_round_trip_error_is_within_the_step(method, kw):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 200, 256, generator=g) * 0.02
    qw = quantize(w, method, **kw)
    qw.validate()
    err = (dequantize(qw) - w).abs()
    # Relative to each channel's largest weight: half a step of 1/127, 1/7, or fp8's 3-bit mantissa (1/16).
    rel = (err.amax(-1) / w.abs().amax(-1)).max().item()
    bound = {"int8": 0.5 / 127, "int4": 0.5 / 7, "fp8": 1 / 16}[method] + 1e-6
    assert rel <= bound
    assert rel > 0  # quantization did round something


def test_int4_packing_order_low_nibble_first():
    w = torch.zeros(1, 128)
    w[0, 0], w[0, 1] = 7.0, -8.0 * 7 / 8  # scale = 1: q(col 0) = 7, q(col 1) = -7
    qw = quantize(w, "int4")
    assert qw.qweight[0, 0].item() == (7 + 8) | ((-7 + 8) << 4)
    assert torch.equal(dequantize(qw)[0, :2], torch.tensor([7.0, -7.0]))


def test_zero_channel_has_unit_scale():
    qw = quantize(torch.zeros(2, 128), "int8")
    assert torch.equal(qw.scale, torch.ones(2))
    assert torch.equal(dequantize(qw), torch.zeros(2, 128))


def test_fp8_block_scales_cover_partial_blocks():
    w = torch.randn(130, 300)
    qw = quantize(w, "fp8", block=True)
    assert qw.block and tuple(qw.scale.shape) == (2, 3)
    assert torch.allclose(dequantize(qw), w, rtol=0.07, atol=1e-3)


def test_validate_names_the_tensor_and_the_mismatch():
    qw = quantize(torch.randn(4, 256), "int4")
    bad = QuantizedWeight("int4", qw.qweight, qw.scale[:, :1], qw.shape, qw.group_size)
    with pytest.raises(QuantFormatError, match="layers.0.mlp.down_proj.*scale"):
        bad.validate("layers.0.mlp.down_proj")
    with pytest.raises(QuantFormatError, match="multiple of the group size"):
        quantize(torch.randn(4, 100), "int4")
    with pytest.raises(QuantFormatError, match="unknown quantization method 'int3'"):
        quantize(torch.randn(4, 128), "int3")
