"""The native quantized CPU kernels (param2moe/kernels/cpu/quant_decode.c: quant_linear, quant_moe) against torch
oracles on the dequantized weights (quant.dequantize), SIMD and plain C paths.

Two oracles. The exact one quantizes the activations as the kernel does (int8 per block of 128 columns,
round-to-nearest-even, scale max|x| / 127) and multiplies in float32: the kernel's integer sums are exact, so
only the order of the float additions differs (fp32: ~1e-6), plus, for bf16, the bf16 roundings both sides make
(a value near a rounding boundary lands on the other side: an ulp of bf16, 2^-8 relative). The plain oracle
keeps the activations unquantized: the kernel is off it by the activation rounding alone, an element's error at
most 1/254 of its block's max (about 0.6% of the output's norm for Gaussian inputs; bounded below at 1.5%)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from param2moe.kernels import cpu as native
from param2moe.kernels import moe
from param2moe.quant import dequantize, quantize

pytestmark = pytest.mark.skipif(
    native._quant_lib() is None, reason="no C compiler (or the native CPU kernels failed to build)")

EXACT = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
# The MoE's second quantization (silu * up, computed by both sides in a different order and, for bf16, rounded)
# can land an element on the other side of an int8 rounding boundary: that down input moves by one step, the
# output by up to max|act| / 127 * |w2 column|; the output's norm moves much less (checked alone, tighter).
MOE_EXACT = {torch.float32: (dict(atol=5e-3, rtol=1e-5), 1e-3), torch.bfloat16: (dict(atol=5e-2, rtol=2e-2), 8e-3)}


@pytest.fixture(params=["simd", "no-amx", "generic"])
def quant_path(request):
    """The kernels' fastest code (AMX tiles from 8 activation rows where the CPU has them, AVX512-VNNI below),
    the VNNI code alone, then the plain C code."""
    native._state["generic"] = {"simd": False, "no-amx": 2, "generic": True}[request.param]
    yield request.param
    native._state["generic"] = False


def fake_quant(x: torch.Tensor) -> torch.Tensor:
    """x (float32) as the kernel sees it: quantized to int8 per block of 128 along the last dim, dequantized."""
    *lead, k = x.shape
    kp = -(-k // 128) * 128
    blocks = F.pad(x, (0, kp - k)).reshape(*lead, kp // 128, 128)
    amax = blocks.abs().amax(-1, keepdim=True)
    # tensor / tensor: 127.0 / amax would be amax.reciprocal() * 127 (two roundings; the kernel divides once)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    return (torch.round(blocks * inv) * (amax / 127.0)).reshape(*lead, kp)[..., :k]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want).norm() / want.norm()).item()


def _bf16(x: torch.Tensor, on: bool) -> torch.Tensor:
    return x.bfloat16().float() if on else x


def moe_oracle(x, w13, w2, weights, ids, act_quant: bool) -> torch.Tensor:
    """sum_k weights * down(silu(gate(x)) * up(x)) in float32 on dequantized weights, pair by pair, with the
    bf16 roundings of kernels.moe.moe_experts when x is bf16 and, with act_quant, the kernel's activation
    quantization of x and of silu * up."""
    bf = x.dtype == torch.bfloat16
    g13, g2 = dequantize(w13), dequantize(w2)
    fq = fake_quant if act_quant else (lambda v: v)
    xq = fq(x.float())
    width = g13.shape[1] // 2
    y = torch.zeros(x.shape[0], g2.shape[1])
    for e in range(g13.shape[0]):  # ascending expert: a token's terms in the kernel's order
        tok, slot = (ids == e).nonzero(as_tuple=True)
        gu = xq[tok] @ g13[e].T
        g, u = _bf16(gu[:, :width], bf), _bf16(gu[:, width:], bf)
        a = _bf16(_bf16(F.silu(g), bf) * u, bf)
        y.index_add_(0, tok, _bf16(fq(a) @ g2[e].T, bf) * weights[tok, slot, None])
    return y


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t,k,n", [
    (1, 512, 768),   # batch 1, the benchmark model's qkv
    (16, 1024, 64),  # 16 tokens: four full token tiles
    (7, 256, 37),    # rows not a multiple of 4 (an edge tile), tokens not of 4
    (3, 200, 20),    # int8: K not a multiple of 128 (a short last block)
    (40, 384, 24),   # prefill-like T: AMX on whole tiles of 16 rows and of 16 tokens, VNNI on the 8 rows left
    (33, 256, 48),   # 33 tokens: a token tile of one
])
def test_linear_matches_the_oracles(method, dtype, t, k, n, quant_path):
    if method == "int4" and k % 128:
        pytest.skip("int4 groups of 128")
    g = torch.Generator().manual_seed(t * 100 + k + n)
    qw = quantize(torch.randn(n, k, generator=g) / k ** 0.5, method)
    x = torch.randn(t, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    got = native.quant_linear(x, qw, bias)
    assert got is not None and got.dtype == dtype and got.shape == (t, n)
    w = dequantize(qw)
    torch.testing.assert_close(got.float(), fake_quant(x.float()) @ w.T + bias.float(), **EXACT[dtype])
    assert rel_err(got, x.float() @ w.T + bias.float()) < 1.5e-2
    assert native.quant_linear(x[None], qw).shape == (1, t, n)  # leading dims kept


def test_linear_float32_out_of_bf16(quant_path):
    """out_dtype=float32 (the head's logits): the sums unrounded."""
    g = torch.Generator().manual_seed(6)
    qw = quantize(torch.randn(40, 256, generator=g), "int4")
    x = torch.randn(20, 256, generator=g).bfloat16()
    got = native.quant_linear(x, qw, out_dtype=torch.float32)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, fake_quant(x.float()) @ dequantize(qw).T, **EXACT[torch.float32])


def test_linear_groups_longer_than_128(quant_path):
    g = torch.Generator().manual_seed(5)
    qw = quantize(torch.randn(8, 512, generator=g), "int4", group_size=256)
    x = torch.randn(3, 512, generator=g)
    torch.testing.assert_close(native.quant_linear(x, qw), fake_quant(x) @ dequantize(qw).T, **EXACT[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t,k,n,group", [
    (1, 192, 40, 64),    # the demo model's hidden size: a short last block of one group
    (7, 96, 37, 32),     # one short block of three groups, an edge tile
    (40, 384, 24, 64),   # prefill-like T: VNNI (the AMX tiles take whole blocks of one scale)
    (16, 256, 64, 32),   # four groups a block
])
def test_linear_int4_groups_under_128(dtype, t, k, n, group, quant_path):
    """int4 groups of 32 or 64 columns (models whose widths 128 does not divide): a sum per group in each block."""
    g = torch.Generator().manual_seed(t + k + n + group)
    qw = quantize(torch.randn(n, k, generator=g) / k ** 0.5, "int4", group_size=group)
    x = torch.randn(t, k, generator=g).to(dtype)
    got = native.quant_linear(x, qw)
    assert got is not None and got.dtype == dtype
    w = dequantize(qw)
    torch.testing.assert_close(got.float(), fake_quant(x.float()) @ w.T, **EXACT[dtype])
    assert rel_err(got, x.float() @ w.T) < 1.5e-2


def _moe_inputs(t, k, h, i, e, dtype, method, seed, none_frac=0.1, group=128):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g).to(dtype)
    kw = {"group_size": group} if method == "int4" else {}
    w13 = quantize(torch.randn(e, 2 * i, h, generator=g) / h ** 0.5, method, **kw)
    w2 = quantize(torch.randn(e, h, i, generator=g) / i ** 0.5, method, **kw)
    ids = torch.stack([torch.randperm(e - 1, generator=g)[:k] for _ in range(t)])  # expert e - 1 unused
    ids[torch.rand(t, k, generator=g) < none_frac] = -1
    ids[0, 0] = -1
    return x, w13, w2, torch.rand(t, k, generator=g), ids


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t,k,h,i,e", [
    (1, 4, 512, 256, 16),   # the benchmark model at batch 1
    (16, 4, 512, 256, 8),   # 16 sequences
    (9, 3, 256, 384, 6),    # I of 3 blocks: threads owning whole blocks or not
    (5, 2, 200, 100, 4),    # int8: H and I not multiples of 128 or of 16
    (48, 4, 256, 256, 8),   # about 24 rows an expert: AMX tiles (two token tiles), some experts under 8 rows
])
def test_moe_matches_the_oracles(method, dtype, t, k, h, i, e, quant_path):
    if method == "int4" and (h % 128 or i % 128):
        pytest.skip("int4 groups of 128")
    x, w13, w2, weights, ids = _moe_inputs(t, k, h, i, e, dtype, method, seed=t + k + h + i)
    got = native.quant_moe(x, w13, w2, weights, ids)
    assert got is not None and got.dtype == dtype and got.shape == (t, h)
    want = moe_oracle(x, w13, w2, weights, ids, act_quant=True)
    close, norm = MOE_EXACT[dtype]
    torch.testing.assert_close(got.float(), want, **close)
    assert rel_err(got, want) < norm
    # the unquantized-activation oracle; the second factor: the activations of down are quantized too
    plain = moe.moe_experts(x.float(), dequantize(w13), dequantize(w2), weights, ids)
    assert rel_err(got, plain) < 3e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t,k,h,i,e,group", [
    (1, 4, 192, 64, 8, 64),    # the demo model's shapes at batch 1
    (5, 2, 192, 64, 4, 64),
    (48, 4, 256, 96, 8, 32),   # rows for the AMX tiles, which leave such groups to VNNI
])
def test_moe_int4_groups_under_128(dtype, t, k, h, i, e, group, quant_path):
    x, w13, w2, weights, ids = _moe_inputs(t, k, h, i, e, dtype, "int4", seed=t + h + i, group=group)
    got = native.quant_moe(x, w13, w2, weights, ids)
    assert got is not None and got.dtype == dtype
    want = moe_oracle(x, w13, w2, weights, ids, act_quant=True)
    close, norm = MOE_EXACT[dtype]
    torch.testing.assert_close(got.float(), want, **close)
    assert rel_err(got, want) < norm


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_moe_thread_counts_agree(threads):
    """The same sums whether threads own whole activation blocks (quantizing their own) or split them."""
    x, w13, w2, weights, ids = _moe_inputs(12, 4, 256, 256, 8, torch.float32, "int4", seed=3)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        got = native.quant_moe(x, w13, w2, weights, ids)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, moe_oracle(x, w13, w2, weights, ids, act_quant=True),
                               **MOE_EXACT[torch.float32][0])


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("t", [1, 12])
def test_mlp_is_one_expert(method, t, quant_path):
    """quant_mlp (the MLP as one expert of weight 1) against the oracle: down(silu(gate) * up), both
    activations quantized as the kernel does."""
    g = torch.Generator().manual_seed(t)
    gate_up = quantize(torch.randn(512, 256, generator=g) / 16, method)
    down = quantize(torch.randn(256, 256, generator=g) / 16, method)
    x = torch.randn(t, 256, generator=g)
    gu = fake_quant(x) @ dequantize(gate_up).T
    want = fake_quant(F.silu(gu[:, :256]) * gu[:, 256:]) @ dequantize(down).T
    torch.testing.assert_close(native.quant_mlp(x, gate_up, down), want, **MOE_EXACT[torch.float32][0])


def test_onednn_after_amx():
    """oneDNN's bf16 matmuls (AMX tiles of their own) still right after the kernels configured and released theirs."""
    from param2moe.kernels.matmul import linear

    g = torch.Generator().manual_seed(4)
    w, x = torch.randn(64, 512, generator=g), torch.randn(32, 512, generator=g)
    want = linear(x.bfloat16(), w.bfloat16()).float()
    native.quant_linear(x, quantize(w, "int8"))
    torch.testing.assert_close(linear(x.bfloat16(), w.bfloat16()).float(), want)


def test_moe_no_pairs_and_bad_ids():
    x, w13, w2, weights, ids = _moe_inputs(4, 2, 128, 128, 4, torch.float32, "int8", seed=1)
    assert torch.equal(native.quant_moe(x, w13, w2, weights, torch.full_like(ids, -1)), torch.zeros(4, 128))
    ids[1, 1] = 4
    with pytest.raises(RuntimeError, match="expert id out of range"):
        native.quant_moe(x, w13, w2, weights, ids)


def test_declines_what_it_does_not_take(fresh_native, monkeypatch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 256, generator=g)
    q8, q4 = quantize(torch.randn(16, 256, generator=g), "int8"), quantize(torch.randn(16, 256, generator=g), "int4")
    assert native.quant_linear(x, quantize(torch.randn(16, 256, generator=g), "fp8")) is None
    assert native.quant_linear(x, quantize(torch.randn(16, 256, generator=g), "int4", group_size=16)) is None
    assert native.quant_linear(x[:, :128], q8) is None  # K mismatch
    assert native.quant_linear(x.half(), q8) is None
    _, w13, w2, weights, ids = _moe_inputs(2, 2, 256, 128, 4, torch.float32, "int8", seed=2)
    _, w13_4, _, _, _ = _moe_inputs(2, 2, 256, 128, 4, torch.float32, "int4", seed=2)
    assert native.quant_moe(x, w13_4, w2, weights, ids) is None  # methods differ
    assert native.quant_moe(x, w13, w2, weights[:, :1], ids) is None
    assert native.quant_linear(x, q4) is not None
    monkeypatch.setenv("P2M_CPU_NATIVE_MOE", "0")
    native.set_moe_enabled(None)
    assert native.quant_moe(x, w13, w2, weights, ids) is None and native.quant_linear(x, q4) is not None
    native.set_enabled(False)
    assert native.quant_linear(x, q4) is None


def test_no_compiler_means_none(failing_compiler):
    qw = quantize(torch.randn(8, 128), "int8")
    assert native.quant_linear(torch.randn(1, 128), qw) is None


def test_plain_c_build_without_vnni(monkeypatch):
    """The library built without the VNNI code (as on CPUs without it) gives the same sums."""
    lib = native._load(("quant_decode", "no-vnni"), native._QUANT_SRC, ("P2M_NO_VNNI",), native._setup_quant)
    assert lib is not None
    monkeypatch.setitem(native._state["libs"], ("quant_decode",), lib)
    x, w13, w2, weights, ids = _moe_inputs(6, 4, 256, 128, 8, torch.bfloat16, "int4", seed=9)
    torch.testing.assert_close(native.quant_moe(x, w13, w2, weights, ids).float(),
                               moe_oracle(x, w13, w2, weights, ids, act_quant=True), **MOE_EXACT[torch.bfloat16][0])
