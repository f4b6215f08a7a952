"""The Triton kernels for quantized weights (param2moe/kernels/triton/quant.py) against torch on the dequantized
weights (`param2moe.quant.dequantize`): F.linear, and the plain torch MoE (param2moe/kernels/moe.py).

Runs on CUDA when a GPU is there, else through Triton's interpreter on small shapes (see
tests/test_triton_kernels.py, whose poisoning and tolerances this file shares). The stored values are drawn
over each method's whole code range (int8 -128..127, every int4 nibble, fp8 from subnormals to 448), not only
what `quantize` would write, and the scales at random.
"""

from __future__ import annotations

import functools

import pytest
import torch
from test_triton_kernels import CUDA, DEV, check, poisoned, rel_err

from param2moe.kernels import moe as ref_moe
from param2moe.kernels import norm as ref_norm
from param2moe.kernels.triton import moe as tri_moe
from param2moe.kernels.triton import norm as tri_norm
from param2moe.kernels.triton import quant as tq
from param2moe.kernels.triton import routing as tri_routing
from param2moe.quant import dequantize, quantize
from param2moe.quant.formats import FP8_BLOCK, QuantizedWeight

METHODS = ["int8", "int4", "int4-g32", "fp8", "fp8-block"]
DTYPES = [torch.float32, torch.bfloat16]


def random_qweight(method: str, *shape: int, std: float = 1.0) -> QuantizedWeight:
    """A weight of logical shape [..., N, K] in the format, every stored code possible, scales such that the
    dequantized weights have about `std` / sqrt(K) spread."""
    *lead, n, k = shape
    unit = std / k**0.5
    if method == "int8":
        q = torch.randint(-128, 128, shape, dtype=torch.int8, device=DEV)
        s = (0.5 + torch.rand(*lead, n, device=DEV)) * unit / 64
        return QuantizedWeight("int8", q, s, tuple(shape))
    if method.startswith("int4"):
        g = 32 if method == "int4-g32" else 128
        q = torch.randint(0, 256, (*lead, n, k // 2), dtype=torch.uint8, device=DEV)
        s = (0.5 + torch.rand(*lead, n, k // g, device=DEV)) * unit / 4
        return QuantizedWeight("int4", q, s, tuple(shape), g)
    # fp8: magnitudes spread over 2^-10 .. 2^8 (subnormals below 2^-6), both signs
    mag = torch.exp2(torch.empty(shape, device=DEV).uniform_(-10, 8.8))
    q = (mag * torch.randn(shape, device=DEV).sign()).to(torch.float8_e4m3fn)
    if method == "fp8-block":
        s = (0.5 + torch.rand(*lead, -(-n // FP8_BLOCK), -(-k // FP8_BLOCK), device=DEV)) * unit / 60
        return QuantizedWeight("fp8", q, s, tuple(shape), FP8_BLOCK)
    s = (0.5 + torch.rand(*lead, n, device=DEV)) * unit / 60
    return QuantizedWeight("fp8", q, s, tuple(shape))


def oracle_linear(x, qw, bias=None, *, path=None, variant=None):
    """F.linear on the dequantized weight, in x's dtype (bf16: the weight rounded to bf16 first, as a bf16
    model's would be). Where `tq.linear(x, qw, path=path, variant=variant)` runs the int4 GEMV with x in int8
    (`tq.gemv_x_int8`): on x quantized as the kernel quantizes it, in float64."""
    if tq.gemv_x_int8(qw, "linear", variant, t=x.shape[0], path=path):
        xq = tq.x_int8_reference(x, qw.group_size).double()
        return torch.nn.functional.linear(xq, dequantize(qw, torch.float64),
                                          None if bias is None else bias.double()).to(x.dtype)
    return torch.nn.functional.linear(x, dequantize(qw, x.dtype), bias)


# ------------------------------------------------------------------------------------ linear
LINEAR_SHAPES = [(1, 48, 256), (3, 40, 384), (16, 72, 256), (64, 100, 128)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,n,k", LINEAR_SHAPES)
@pytest.mark.parametrize("method", METHODS)
def test_linear(method, t, n, k, dtype):
    if method == "int4-g32" and t > 3:
        pytest.skip("group 32: the small shapes suffice")
    qw = random_qweight(method, n, k)
    x = torch.randn(t, k, device=DEV).to(dtype)
    assert tq.usable(x, qw) == (CUDA or tq.INTERPRET)
    with poisoned():
        out = tq.linear(x, qw, act="keep")  # weight-only (fp8 at 64 tokens would quantize x: its own tests)
    assert out.dtype == dtype
    check(out, oracle_linear(x, qw), dtype)


@pytest.mark.parametrize("path", ["gemv", "mma"])
@pytest.mark.parametrize("method", METHODS)
def test_linear_both_kernels_with_bias(method, path):
    """Each kernel at a token count the other one would serve (the GEMV at 9 tokens, the tiled GEMM at 2), a
    bias added in its epilogue, fp16 activations."""
    t = 9 if path == "gemv" else 2
    qw = random_qweight(method, 33, 256)
    x = torch.randn(t, 256, device=DEV).to(torch.float16)
    bias = torch.randn(33, device=DEV).to(torch.float16)
    with poisoned():
        out = tq.linear(x, qw, bias, path=path)
    check(out, oracle_linear(x, qw, bias, path=path), torch.float16)


@pytest.mark.parametrize("method", ["int8", "int4", "fp8-block"])
def test_linear_gemv_in_chunks_of_k(method, monkeypatch):
    """K past one GEMV chunk: the rows stream through a loop of chunks (the dense MLP's down, K = 9216), the
    last one partial."""
    monkeypatch.setattr(tq, "GEMV_CHUNK", 256)
    qw = random_qweight(method, 20, 640)
    x = torch.randn(2, 640, device=DEV)
    with poisoned():
        out = tq.linear(x, qw, path="gemv")
    check(out, oracle_linear(x, qw, path="gemv"), torch.float32)


def test_linear_extreme_activations():
    """The int kernels scale x by powers of two up to 2^89 before the products (quant.py, `_word_value`):
    activations from 1e-8 to 1e8 in one row stay exact in fp32 (int4: x in bf16, variant gemv_a16)."""
    x = torch.randn(1, 256, device=DEV) * torch.exp2(torch.empty(1, 256, device=DEV).uniform_(-26, 26))
    for method in ("int8", "int4"):
        qw = random_qweight(method, 24, 256)
        with poisoned():
            out = tq.linear(x, qw, path="gemv", variant="gemv_a16")
        check(out, oracle_linear(x.double(), qw, variant="gemv_a16").float(), torch.float32)


def test_usable_and_errors():
    x = torch.randn(2, 256, device=DEV)
    ok = random_qweight("int4", 8, 256)
    assert tq.usable(x, ok) == (CUDA or tq.INTERPRET)
    assert not tq.usable(x[:, :128], ok)  # K does not match
    assert not tq.usable(x.to(torch.int32), ok)
    stack = random_qweight("int8", 2, 8, 256)
    assert tq.usable(x, stack) == (CUDA or tq.INTERPRET)  # a stack of experts: moe_experts' w13
    with pytest.raises(ValueError, match="not served"):
        tq.linear(x, stack)  # but not a linear layer's weight
    g16 = QuantizedWeight("int4", ok.qweight, torch.ones(8, 16, device=DEV), (8, 256), 16)
    assert not tq.usable(x, g16)  # groups under 32 columns
    broken = QuantizedWeight("int8", ok.qweight, ok.scale, (8, 256))
    assert not tq.usable(x, broken)  # fails the format's validation
    with pytest.raises(ValueError, match="int8 weight"):
        tq.linear(x, broken)


# ------------------------------------------------------------------------------------ fused MoE
MOE_CASES = [
    # t, e, h, i, k, missing, config
    (1, 6, 256, 128, 3, True, None),
    (3, 6, 256, 128, 3, True, None),
    (20, 4, 128, 256, 3, True, {"BLOCK_M": 32, "gate_up": dict(BLOCK_N=32, BLOCK_K=64, GROUP_M=4, num_warps=4,
                                                                 num_stages=2),
                                "down": dict(BLOCK_N=64, BLOCK_K=256, GROUP_M=2, num_warps=4, num_stages=2)}),
]


def _moe_inputs(method, t, e, h, i, k, dtype, missing):
    x = torch.randn(t, h, device=DEV).to(dtype)
    w13 = random_qweight(method, e, 2 * i, h, std=2.0)
    w2 = random_qweight(method, e, h, i)
    ids = torch.rand(t, e, device=DEV).topk(k, dim=-1).indices
    if missing:
        ids[torch.rand(t, k, device=DEV) < 0.2] = -1
    return x, w13, w2, torch.rand(t, k, device=DEV), ids


def moe_int8_x(x, w13, variant=None) -> bool:
    """Whether tq.moe_experts runs x [T, H] through the int4 GEMV with x in int8 (`tq.gemv_x_int8`)."""
    return tq.gemv_x_int8(w13, "gate_up", variant, t=x.shape[0])


def moe_loose(x, w13, variant=None) -> float:
    """check()'s bf16 tolerance against oracle_moe: 3e-2 where the down's x goes to int8 (an intermediate value one
    bf16 step off the oracle's, the GPU's exp being approximate, moves its group's int8 grid: differences of the
    quantization's own size, ~1% on random weights; a wrong scale or offset is far larger), else check's 8e-3."""
    return 3e-2 if moe_int8_x(x, w13, variant) else 8e-3


def check_moe(out, x, w13, w2, weights, ids, dtype, variant=None, **kw):
    """check() of a moe_experts output against `oracle_moe`, at `moe_loose`'s bf16 tolerance."""
    check(out, oracle_moe(x, w13, w2, weights, ids, variant), dtype, loose=moe_loose(x, w13, variant), **kw)


def oracle_moe(x, w13, w2, weights, ids, variant=None):
    """The plain torch MoE on the dequantized weights; at one token, where the int4 GEMV takes x in int8
    (`moe_int8_x`), `oracle_moe_int8_x`."""
    if moe_int8_x(x, w13, variant):
        return oracle_moe_int8_x(x, w13, w2, weights, ids)
    return ref_moe.moe_experts(x, dequantize(w13, x.dtype), dequantize(w2, x.dtype), weights, ids)


def oracle_moe_int8_x(x, w13, w2, weights, ids):
    """One token's int4 MoE with x in int8 (the GEMV's X_INT8): the oracle on the dequantized weights (float64)
    with the gate/up's x and the down's x quantized as the kernel quantizes them (`tq.x_int8_reference`), and
    the roundings to x's dtype where the torch MoE has them (gate and up, silu, their product, each down row)."""
    g = w13.group_size
    w13d, w2d = dequantize(w13, torch.float64), dequantize(w2, torch.float64)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for t, k in zip(*torch.nonzero(ids >= 0, as_tuple=True)):
        e = ids[t, k]
        gate_up = (tq.x_int8_reference(x[t:t + 1], g).double() @ w13d[e].T).to(x.dtype)
        act = ref_moe.silu_and_mul(gate_up)
        y = (tq.x_int8_reference(act, g).double() @ w2d[e].T).to(x.dtype)
        out[t] += weights[t, k].float() * y[0].float()
    return out.to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(MOE_CASES)))
@pytest.mark.parametrize("method", ["int8", "int4", "fp8", "fp8-block"])
def test_moe_experts(method, case, dtype):
    t, e, h, i, k, missing, cfg = MOE_CASES[case]
    x, w13, w2, weights, ids = _moe_inputs(method, t, e, h, i, k, dtype, missing)
    with poisoned():
        out = tq.moe_experts(x, w13, w2, weights, ids, config=cfg)
    check_moe(out, x, w13, w2, weights, ids, dtype, tight=2e-5)


@pytest.mark.parametrize("method", ["int8", "int4", "fp8"])
def test_moe_quantize_round_trip_one_token_and_batch(method):
    """Weights written by `quantize` (the online path), the folded shared expert's columns last (loaded before
    the kernel waits: num_appended), then summed inside the next add + RMSNorm."""
    e, h, i, k = 8, 128, 128, 3
    w13 = quantize(torch.randn(e, 2 * i, h, device=DEV) / 11, method)
    w2 = quantize(torch.randn(e, h, i, device=DEV) / 11, method)
    nw = (1 + 0.1 * torch.randn(h, device=DEV))
    for t in (1, 5):
        x = torch.randn(t, h, device=DEV)
        ids = torch.cat([torch.rand(t, e - 2, device=DEV).topk(k, dim=-1).indices,
                         torch.tensor([[e - 2, e - 1]] * t, device=DEV)], dim=1)
        weights = torch.cat([torch.rand(t, k, device=DEV), torch.ones(t, 2, device=DEV)], dim=1)
        r = torch.randn(t, h, device=DEV)
        with poisoned():
            pair_out = tq.moe_experts(x, w13, w2, weights, ids, unsummed=True, num_appended=2)
            out, res = tri_norm.expert_sum_add_rms_norm(pair_out, weights, ids, r, nw, 1e-6)
        assert pair_out.shape == (t * (k + 2), h)
        ref_out, ref_res = ref_norm.add_rms_norm(oracle_moe(x, w13, w2, weights, ids), r, nw, 1e-6)
        check(res, ref_res, torch.float32, tight=2e-5)
        check(out, ref_out, torch.float32, tight=2e-5)


@pytest.mark.parametrize("method", ["int4", "fp8-block"])
def test_one_token_mlp_as_one_expert_in_chunks(method, monkeypatch):
    """A dense MLP at one token as a single expert of its whole width (ops.mlp's form), the down rows in
    chunks of K when the width passes one GEMV chunk."""
    monkeypatch.setattr(tq, "GEMV_CHUNK", 256)
    h, width = 128, 640
    x = torch.randn(1, h, device=DEV)
    gate_up, down = random_qweight(method, 1, 2 * width, h), random_qweight(method, 1, h, width)
    one, zero = torch.ones(1, 1, device=DEV), torch.zeros(1, 1, dtype=torch.long, device=DEV)
    with poisoned():
        out = tq.moe_experts(x, gate_up, down, one, zero)
    check(out, oracle_moe(x, gate_up, down, one, zero), torch.float32, tight=2e-5)


def test_moe_errors_name_the_problem():
    x, w13, w2, weights, ids = _moe_inputs("int8", 2, 4, 128, 64, 2, torch.float32, False)
    assert tq.moe_usable(x, w13, w2) == (CUDA or tq.INTERPRET)
    assert not tq.moe_usable(x, w2, w13) and not tq.moe_usable(x[:, :64], w13, w2)
    with pytest.raises(ValueError, match="w2"):
        tq.moe_experts(x, w13, random_qweight("int8", 4, 128, 32), weights, ids)
    with pytest.raises(ValueError, match="hidden size 128"):
        tq.moe_experts(x[:, :64], w13, w2, weights, ids)
    with pytest.raises(ValueError, match="ids"):
        tq.moe_experts(x, w13, w2, weights, ids[:, :1])
    bad = QuantizedWeight("int8", w2.qweight, w2.scale[:, :10], w2.shape)
    with pytest.raises(ValueError, match="w2: int8 weight"):
        tq.moe_experts(x, w13, bad, weights, ids)


# ------------------------------------------------------------------------------- MoE variants
def _variant_cases():
    """(variant, t): each selectable variant at the token counts where it changes what runs (one token: the
    GEMV's shapes or the tiles at one token; 3 tokens: the tiles)."""
    cases = []
    for name, v in tq.MOE_VARIANTS.items():
        if any(v.changes(1, m) for m in (tq.INT8, tq.INT4, tq.FP8, tq.FP8_BLOCK_SCALED)) or name == "default":
            cases.append((name, 1))
        if v.tiles or v.joins_otherwise(tq.INT4) or name == "default":
            cases.append((name, 3))
    return cases


def _moe_variant_check(method, variant, t, h, i):
    """The variant on e=6 experts (the last two the folded shared expert), summed and unsummed, vs the oracle."""
    e, k = 6, 2
    x = torch.randn(t, h, device=DEV).to(torch.bfloat16)
    w13, w2 = random_qweight(method, e, 2 * i, h, std=2.0), random_qweight(method, e, h, i)
    ids = torch.cat([torch.rand(t, e - 2, device=DEV).topk(k, dim=-1).indices,
                     torch.tensor([[e - 2, e - 1]] * t, device=DEV)], dim=1)
    ids[0, 0] = -1
    weights = torch.rand(t, k + 2, device=DEV)
    with poisoned():
        out = tq.moe_experts(x, w13, w2, weights, ids, num_appended=2, variant=variant)
    check_moe(out, x, w13, w2, weights, ids, torch.bfloat16, variant)


@pytest.mark.parametrize("method", ["int4", "int4-g32", "fp8-block"])
@pytest.mark.parametrize("variant,t", _variant_cases())
def test_moe_variants(variant, t, method):
    """Every entry of quant.MOE_VARIANTS against the oracle (fp8 per channel shares fp8-block's code but for the
    scale's place). Hidden 384: a 256-column BLOCK_K (join_k256) ends past K, a half step masked and its second
    scale group missing."""
    if method == "int4-g32" and not (tq.MOE_VARIANTS[variant].int4_join and t > 1):
        pytest.skip("group 32: for the joined int4 steps (8 groups a step)")
    _moe_variant_check(method, variant, t, 384, 128)


@pytest.mark.parametrize("method,xsplit", [("int4", False), ("int4", True), ("int8", False), ("fp8-block", False)])
def test_moe_gemv_pipelined_chunks(method, xsplit, monkeypatch):
    """The pipelined GEMV (MoeVariant.gemv with chunks and stages) with rows of several chunks: gate/up K=384 in
    3 chunks of 128, down K=256 in 2 (the registered variants' chunks of 512 span these rows whole)."""
    small = {m: {"gate_up": (8192, 4, 128, 3, xsplit), "down": (8192, 4, 128, 2, xsplit)}
             for m in (tq.INT4, tq.INT8, tq.FP8, tq.FP8_BLOCK_SCALED)}
    monkeypatch.setitem(tq.MOE_VARIANTS, "pipe_small", tq.MoeVariant(gemv=small))
    _moe_variant_check(method, "pipe_small", 1, 384, 256)


@pytest.mark.parametrize("variant", ["default", "gemv_plain", "gemv_pipe", "gemv_pipe_noxsplit", "gemv_small",
                                     "linear_pipe", "linear_preload", "gemv_a16"])
@pytest.mark.parametrize("method", ["int4", "int8", "fp8-block"])
def test_linear_gemv_variants(method, variant):
    """A variant's "linear" GEMV (the pipelined ones: K 1536 in 3 chunks of 512), 2 tokens, a bias."""
    qw = random_qweight(method, 24, 1536)
    x = torch.randn(2, 1536, device=DEV).to(torch.bfloat16)
    bias = torch.randn(24, device=DEV).to(torch.bfloat16)
    with poisoned():
        out = tq.linear(x, qw, bias, path="gemv", variant=variant)
    check(out, oracle_linear(x, qw, bias, path="gemv", variant=variant), torch.bfloat16)


@pytest.mark.parametrize("t", [1, 3])
@pytest.mark.parametrize("chunks", [1, 3])
@pytest.mark.parametrize("method", ["int4", "int4-g32"])
def test_int4_gemv_with_x_in_int8(method, chunks, t, monkeypatch):
    """The int4 GEMV with x quantized to int8 per weight group and multiplied 4 values an instruction (dp4a;
    XSPLIT == X_INT8): against the oracle on x quantized as `x_int8_reference` says, to fp32 rounding (x
    fp32), which the weight-only oracle misses by far; a group of zeros (scale 0), x from 1e-6 to 1e3 across
    groups, K = 1536 whole or in 3 pipelined chunks, and groups past K in the last chunk (K 1408)."""
    shape = (8192, 4, 512 if chunks == 3 else 0, 2 if chunks == 3 else 0, tq.X_INT8)
    monkeypatch.setitem(tq.MOE_VARIANTS, "a8_test", tq.MoeVariant(gemv={tq.INT4: {"linear": shape}}))
    for k in (1536, 1408):
        qw = random_qweight(method, 24, k)
        x = torch.randn(t, k, device=DEV) * torch.exp2(torch.empty(t, k // 128, device=DEV).uniform_(-20, 10)
                                                       ).repeat_interleave(128, 1)
        x[0, 128:256] = 0
        with poisoned():
            out = tq.linear(x, qw, path="gemv", variant="a8_test")
        ref = torch.nn.functional.linear(tq.x_int8_reference(x, qw.group_size).double(),
                                         dequantize(qw, torch.float64)).float()
        check(out, ref, torch.float32)
        assert rel_err(out, oracle_linear(x, qw, variant="gemv_a16")) > 1e-4  # the oracle of x in fp32 would not pass


def test_x_int8_reference():
    """x quantized per group to round-to-even(x * 127 / max|x|) * max|x| / 127: the group's max exact, ties to
    even, a zero group stays zero."""
    x = torch.tensor([[127.0, -63.5, 0.5, 1.5, 0.0, 0.0, 0.0, 0.0]])
    assert tq.x_int8_reference(x, 4).tolist() == [[127.0, -64.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0]]


@pytest.mark.parametrize("method,variant", [("int4", "default"), ("int4-g32", "default"), ("int4", "nojoin"),
                                            ("int4", "lin16"), ("fp8-block", "lin16")])
def test_linear_tile_variants(method, variant):
    """The tiled linear with a variant's int4_join / linear_tiles (K 384: with BLOCK_K 256 a step past K)."""
    qw = random_qweight(method, 40, 384)
    x = torch.randn(16, 384, device=DEV).to(torch.bfloat16)
    cfg = (16, {"BLOCK_N": 32, "BLOCK_K": 256, "GROUP_M": 1, "num_warps": 4, "num_stages": 2})
    with poisoned():
        for config in (None, cfg):
            out = tq.linear(x, qw, path="mma", config=config, variant=variant)
            check(out, oracle_linear(x, qw, path="mma"), torch.bfloat16)


def test_moe_variant_names():
    x, w13, w2, weights, ids = _moe_inputs("int4", 1, 4, 128, 64, 2, torch.float32, False)
    with pytest.raises(ValueError, match="'nope' is not a quantized MoE variant; known: default"):
        tq.moe_experts(x, w13, w2, weights, ids, variant="gemv_pipe+nope")
    both = tq.moe_variant("gemv_pipe+nojoin+k256")
    assert both.gemv == tq.MOE_VARIANTS["gemv_pipe"].gemv and not both.int4_join and both.tiles == {"BLOCK_K": 256}
    assert tq.moe_variant("default") == tq.MoeVariant()


@pytest.mark.parametrize("chunks", [1, 2])
@pytest.mark.parametrize("method", ["int4", "int4-a16", "fp8", "fp8-block"])
def test_gate_up_launched_behind_the_router(method, chunks, monkeypatch):
    """One token, the shared expert folded in as the last 2 experts: the quantized gate/up launched behind the
    router (the shared expert's programs norm the row themselves, the routed ones read the router's row and
    ids) gives the pairs of the gate/up launched after it, and the oracle's sum on the router's normed row.
    chunks 2: the rows in two pipelined chunks, as Param2's (the registered shapes take these rows whole), and
    row blocks of 8 (fp8) or 16 (int4) rows, several a column."""
    h, i, e, k = 256, 128, 8, 3
    variant = "gemv_a16" if method == "int4-a16" else None
    xmode = tq.X_SPLIT if method == "int4-a16" else tq.X_INT8
    method = method.removesuffix("-a16")
    if chunks == 2:
        two = {m: {"gate_up": (1024, 4, 128, 3, xmode), "down": (8192, 4, 128, 2, xmode)}
               for m in (tq.INT4, tq.FP8, tq.FP8_BLOCK_SCALED)}
        monkeypatch.setitem(tq.MOE_VARIANTS, "two_chunks", tq.MoeVariant(gemv=two))
        variant = "two_chunks"
    gate_up = functools.partial(tq.gate_up_one_token, variant=variant)
    dtype = torch.bfloat16
    gate = torch.randn(e, h, device=DEV) / h**0.5
    bias = 0.1 * torch.randn(e, device=DEV)
    nw = (1 + 0.1 * torch.randn(h, device=DEV)).to(dtype)
    w13, w2 = random_qweight(method, e + 2, 2 * i, h, std=2.0), random_qweight(method, e + 2, h, i)
    kw = dict(num_appended=2, routed_scaling_factor=2.5)
    a, r = torch.randn(1, h, device=DEV).to(dtype), (3 * torch.randn(1, h, device=DEV)).to(dtype)
    assert tq.runs_behind_router(a, w13) and not tq.runs_behind_router(a, w13, variant="after_router")
    with poisoned():
        xn, res, w, ids, started = tri_moe.add_rms_norm_gate_route_gate_up(
            a, r, nw, 1e-6, gate, bias, k, w13, overlap=True, gate_up=gate_up, **kw)
        assert started is not None and started.inter.shape == (k + 2, i)
        pair_out = tq.moe_experts(xn, w13, w2, w, ids, unsummed=True, num_appended=2, started=started.inter,
                                  variant=variant)
        # the shared expert's programs alone, the router's row poisoned: they read h + r, never it
        shared = gate_up(torch.full_like(xn, float("nan")), w13, ids[:, k:].contiguous(), (a, r, nw, 1e-6, 2),
                         False, torch.empty(2, i, dtype=dtype, device=DEV))
    check(shared, started.inter[k:], dtype, tight=2e-5)
    xn2, res2, w_2, ids2 = tri_routing.add_rms_norm_gate_route(a, r, nw, 1e-6, gate, bias, k, **kw)
    assert torch.equal(xn, xn2) and torch.equal(res, res2) and torch.equal(ids, ids2)
    assert ids[0, k:].tolist() == [e, e + 1]
    after = tq.moe_experts(xn, w13, w2, w, ids, unsummed=True, num_appended=2,
                           variant=f"{variant}+after_router" if variant else "after_router")
    check(pair_out, after, dtype, tight=2e-5)
    y = tri_norm.expert_sum_add_rms_norm(pair_out, w, ids, res, nw, 1e-6)[1]
    check(y, ref_norm.add_rms_norm(oracle_moe(xn, w13, w2, w, ids, variant), res, nw, 1e-6)[1], dtype,
          loose=moe_loose(xn, w13, variant))


def test_gate_up_behind_the_router_declines_and_checks():
    """int8 (x read by value position) and fp8 activations at one token keep the gate/up after the router; a
    started gate/up of the wrong shape is refused, naming it."""
    x = torch.randn(1, 128, device=DEV).to(torch.bfloat16)
    assert not tq.runs_behind_router(x, random_qweight("int8", 4, 128, 128))
    assert not tq.runs_behind_router(x, random_qweight("int4", 4, 128, 128), variant="gemv_pipe_noxsplit")
    w13, w2 = random_qweight("fp8", 4, 128, 128), random_qweight("fp8", 4, 128, 64)
    assert tq.runs_behind_router(x, w13) and not tq.runs_behind_router(x[:, :64], w13)
    weights, ids = torch.rand(1, 2, device=DEV), torch.tensor([[0, 3]], device=DEV)
    with pytest.raises(ValueError, match=r"started \[3, 64\]"):
        tq.moe_experts(x, w13, w2, weights, ids, started=torch.zeros(3, 64, device=DEV, dtype=x.dtype))


# ------------------------------------------------------------------------------- fp8 activations
def torch_act_quant(x):
    """Per-row fp8 e4m3: scale = max|x| / 448 (1 for a zero row), q = x / scale rounded to nearest."""
    s = x.float().abs().amax(-1) / 448
    s = torch.where(s > 0, s, torch.ones_like(s))
    return (x.float() / s[:, None]).to(torch.float8_e4m3fn), s


def test_act_quant_matches_torch():
    x = torch.randn(7, 512, device=DEV) * torch.exp2(torch.empty(7, 512, device=DEV).uniform_(-14, 3))
    x[3] = 0
    with poisoned():
        q, s = tq.act_quant(x)
    rq, rs = torch_act_quant(x)
    assert torch.equal(s, rs)
    assert torch.equal(q.float(), rq.float())  # subnormals, ties and the zero row included


@pytest.mark.parametrize("t", [2, 40])
@pytest.mark.parametrize("method", ["fp8", "fp8-block"])
def test_linear_fp8_activations(method, t):
    qw = random_qweight(method, 72, 384)
    x = torch.randn(t, 384, device=DEV)
    with poisoned():
        out = tq.linear(x, qw, act="fp8")
    q, s = torch_act_quant(x)
    check(out, torch.nn.functional.linear(q.float() * s[:, None], dequantize(qw)), torch.float32)
    with pytest.raises(ValueError, match="fp8 weights"):
        tq.linear(x, random_qweight("int4", 72, 384), act="fp8")


def test_activation_mode_default(monkeypatch):
    """fp8 weights from FP8_ACT_TOKENS tokens: fp8 activations (the linear and the MoE give exactly act="fp8"'s
    result); below, and for the head's float32 logits and other methods, weight-only (exactly act="keep")."""
    monkeypatch.setattr(tq, "FP8_ACT_TOKENS", 4)
    assert tq.activation_mode(tq.FP8, 4) == tq.activation_mode(tq.FP8_BLOCK_SCALED, 9) == "fp8"
    assert tq.activation_mode(tq.FP8, 3) is None and tq.activation_mode(tq.INT4, 64) is None
    assert tq.activation_mode(tq.FP8, 64, head=True) is None and tq.activation_mode(tq.FP8, 64, "keep") is None
    qw = random_qweight("fp8", 40, 256)
    for t, mode in ((2, "keep"), (6, "fp8")):
        x = torch.randn(t, 256, device=DEV).to(torch.bfloat16)
        with poisoned():
            assert torch.equal(tq.linear(x, qw), tq.linear(x, qw, act=mode))
            head = tq.linear(x, qw, out_dtype=torch.float32)
        assert torch.equal(head, tq.linear(x, qw, out_dtype=torch.float32, act="keep"))
        x, w13, w2, weights, ids = _moe_inputs("fp8", t, 4, 128, 128, 2, torch.bfloat16, True)
        with poisoned():
            assert torch.equal(tq.moe_experts(x, w13, w2, weights, ids), tq.moe_experts(x, w13, w2, weights, ids,
                                                                                        act=mode))
    monkeypatch.setattr(tq, "FP8_ACT_TOKENS", 0)  # 0: never
    assert tq.activation_mode(tq.FP8, 10 ** 6) is None


@pytest.mark.parametrize("t", [1, 6])
@pytest.mark.parametrize("method", ["fp8", "fp8-block"])
def test_moe_fp8_activations(method, t):
    """x quantized per token for the gate/up, each pair's intermediate row per row for the down (one token: the
    GEMVs, fp8 x with its scale; more: the fp8 tensor-core tiles)."""
    e, h, i, k = 4, 128, 128, 2
    x, w13, w2, weights, ids = _moe_inputs(method, t, e, h, i, k, torch.float32, True)
    with poisoned():
        out = tq.moe_experts(x, w13, w2, weights, ids, act="fp8")
    d13, d2 = dequantize(w13), dequantize(w2)
    q, s = torch_act_quant(x)
    xq = q.float() * s[:, None]
    ref = torch.zeros(t, h, device=DEV)
    for tok in range(t):
        for j in range(k):
            ex = int(ids[tok, j])
            if ex < 0:
                continue
            gate, up = (xq[tok] @ d13[ex].T).chunk(2)
            iq, isc = torch_act_quant((torch.nn.functional.silu(gate) * up)[None])
            ref[tok] += weights[tok, j] * ((iq.float() * isc[:, None])[0] @ d2[ex].T)
    # an intermediate value near a rounding boundary may go to the other fp8 neighbour in the kernel than here (fp32
    # sums in another order): ~1e-4 a flip; a missing or wrong activation scale would show as > 3e-2
    check(out, ref, torch.float32, tight=3e-3)


@pytest.mark.skipif(not CUDA, reason="real Param2 shapes on CUDA")
@pytest.mark.parametrize("t", [1, 8, 64, 256])
@pytest.mark.parametrize("method", ["int8", "int4", "fp8", "fp8-block"])
def test_param2_shapes(method, t):
    """Weight-only against the oracle (fp8's default fp8 activations from 64 tokens: test_activation_mode_default
    and the fp8-activation tests)."""
    x, w13, w2, weights, ids = _moe_inputs(method, t, 66, 2048, 2048, 8, torch.bfloat16, False)
    with poisoned():
        out = tq.moe_experts(x, w13, w2, weights, ids, act="keep")
    check_moe(out, x, w13, w2, weights, ids, torch.bfloat16)
    qw = random_qweight(method, 3072, 2048)
    with poisoned():
        y = tq.linear(x, qw, act="keep")
    check(y, oracle_linear(x, qw), torch.bfloat16)


@pytest.mark.skipif(not CUDA, reason="CUDA")
@pytest.mark.parametrize("method", ["int4", "fp8"])
def test_kernels_dispatch_quantized_weights(method):
    """kernels.Kernels on CUDA with QuantizedWeights: the MoE's pairs come back unsummed (ExpertOutputs, the
    folded shared expert's columns last), a dense MLP at one token runs as one expert, the head in float32."""
    from param2moe.kernels import ExpertOutputs, Kernels
    from param2moe.kernels import norm as ref_norm_mod

    ops = Kernels("auto")
    x, w13, w2, weights, ids = _moe_inputs(method, 1, 10, 256, 128, 3, torch.bfloat16, False)
    ids = torch.cat([torch.rand(1, 8, device=DEV).topk(3, dim=-1).indices, torch.tensor([[8, 9]], device=DEV)], dim=1)
    weights = torch.cat([weights, torch.ones(1, 2, device=DEV)], dim=1)
    y = ops.moe_experts(x, w13, w2, weights, ids, unsummed=True, num_appended=2)
    assert isinstance(y, ExpertOutputs)
    check_moe(ref_norm_mod.expert_sum(*y), x, w13, w2, weights, ids, torch.bfloat16)
    gate_up, down = random_qweight(method, 2 * 384, 256), random_qweight(method, 256, 384)
    y = ops.mlp(x, gate_up, down, unsummed=True)
    assert isinstance(y, ExpertOutputs)
    one, zero = torch.ones(1, 1, device=DEV), torch.zeros(1, 1, dtype=torch.long, device=DEV)
    check_moe(ref_norm_mod.expert_sum(*y), x, tq.one_expert(gate_up), tq.one_expert(down), one, zero, torch.bfloat16)
    head = random_qweight(method, 1000, 256)
    logits = ops.logits(x, head)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, oracle_linear(x.float(), head), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not CUDA, reason="CUDA")
@pytest.mark.parametrize("method", ["int8", "int4", "fp8", "fp8-block"])
def test_cuda_graph_capture(method):
    """Linear at 1 and 32 tokens and the MoE at 1 and 6 tokens in one graph; new inputs in the same buffers."""
    h, i, e = 2048, 1024, 16
    xs = [torch.randn(t, h, device=DEV, dtype=torch.bfloat16) for t in (1, 32, 1, 6)]
    qw = random_qweight(method, 1000, h)
    w13, w2 = random_qweight(method, e, 2 * i, h), random_qweight(method, e, h, i)
    ids = [torch.rand(t, e, device=DEV).topk(4, dim=-1).indices for t in (1, 6)]
    wts = [torch.rand(t, 4, device=DEV) for t in (1, 6)]
    run = lambda: (tq.linear(xs[0], qw), tq.linear(xs[1], qw), tq.moe_experts(xs[2], w13, w2, wts[0], ids[0]),  # noqa: E731
                   tq.moe_experts(xs[3], w13, w2, wts[1], ids[1]))
    run()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = run()
    for x in xs:
        x.copy_(torch.randn_like(x))
    for j, t in enumerate((1, 6)):
        ids[j].copy_(torch.rand(t, e, device=DEV).topk(4, dim=-1).indices)
    g.replay()
    torch.cuda.synchronize()
    check(outs[0], oracle_linear(xs[0], qw), torch.bfloat16)
    check(outs[1], oracle_linear(xs[1], qw), torch.bfloat16)
    check_moe(outs[2], xs[2], w13, w2, wts[0], ids[0], torch.bfloat16)
    check_moe(outs[3], xs[3], w13, w2, wts[1], ids[1], torch.bfloat16)
