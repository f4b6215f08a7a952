"""The native CPU routed-expert kernel (param2moe/kernels/cpu/moe_decode.c) against the torch oracle
(kernels.moe.moe_experts) on fresh random inputs, its dispatch from kernels.moe_experts at decode sizes, and
the fallback when it is off or cannot be built."""

from __future__ import annotations

import pytest
import torch

from param2moe import kernels
from param2moe.kernels import cpu as native
from param2moe.kernels import moe

pytestmark = pytest.mark.skipif(
    native._moe_lib() is None, reason="no C compiler (or the native CPU kernels failed to build)")

# fp32: the same products, summed in another order. bf16: a gate/up sum that lands on the other side of a bf16
# rounding boundary moves what follows by an ulp.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _inputs(t, k, h, i, e, dtype, seed, all_take=None, unused=(), none_frac=0.1):
    """Random x, weights (scaled so the outputs stay near 1), routing weights, and ids of k distinct experts
    per token drawn outside `unused`; expert all_take in every token's ids; a fraction of the ids -1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g).to(dtype)
    w13 = (torch.randn(e, 2 * i, h, generator=g) / h ** 0.5).to(dtype)
    w2 = (torch.randn(e, h, i, generator=g) / i ** 0.5).to(dtype)
    pool = torch.tensor([j for j in range(e) if j not in unused])
    ids = torch.stack([pool[torch.randperm(len(pool), generator=g)[:k]] for _ in range(t)])
    if all_take is not None:
        has = (ids == all_take).any(1)
        ids[~has, 0] = all_take
    drop = torch.rand(t, k, generator=g) < none_frac
    if all_take is not None:
        drop &= ids != all_take
    ids[drop] = -1
    if none_frac:
        cand = (ids != (-1 if all_take is None else all_take)).nonzero()
        ids[tuple(cand[-1])] = -1  # at least one
    weights = torch.rand(t, k, generator=g)
    return x, w13, w2, weights, ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t,k,h,i,e", [
    (1, 4, 512, 256, 16),   # batch 1: one row an expert
    (64, 4, 512, 256, 16),  # the benchmark model at batch 64
    (64, 8, 96, 48, 12),    # odd sizes: H, I not multiples of 32
    (7, 2, 96, 48, 5),
    (13, 8, 80, 36, 10),    # I, H with tails under 16, rows not a multiple of 4
])
def test_matches_the_oracle(dtype, t, k, h, i, e, native_path):
    x, w13, w2, weights, ids = _inputs(t, k, h, i, e, dtype, seed=t * 1000 + k * 10 + h, all_take=e // 2,
                                       unused=(0, e - 1))
    assert (ids == -1).any() and (ids == e // 2).any(1).all() and not ((ids == 0) | (ids == e - 1)).any()
    got = native.moe_decode(x, w13, w2, weights, ids)
    assert got is not None and got.dtype == dtype and got.shape == (t, h)
    torch.testing.assert_close(got.float(), moe.moe_experts(x, w13, w2, weights, ids).float(), **TOL[dtype])


@pytest.mark.parametrize("t,k,h,i,e", [(64, 4, 512, 256, 16), (13, 8, 80, 36, 10)])
def test_bf16_without_bf16_dot_products(monkeypatch, t, k, h, i, e):
    """The bf16 path for CPUs without AVX512-BF16 (bf16 weights widened to fp32), built here on purpose."""
    lib = native._load(("moe_decode", "no-dp16"), native._MOE_SRC, ("P2M_NO_DP16",), native._setup_moe)
    assert lib is not None
    monkeypatch.setitem(native._state["libs"], ("moe_decode",), lib)
    x, w13, w2, weights, ids = _inputs(t, k, h, i, e, torch.bfloat16, seed=11, all_take=1)
    torch.testing.assert_close(native.moe_decode(x, w13, w2, weights, ids).float(),
                               moe.moe_experts(x, w13, w2, weights, ids).float(), **TOL[torch.bfloat16])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_pairs_and_repeated_experts(dtype):
    x, w13, w2, weights, ids = _inputs(5, 4, 64, 32, 6, dtype, seed=3)
    ids.fill_(-1)
    assert torch.equal(native.moe_decode(x, w13, w2, weights, ids), torch.zeros(5, 64, dtype=dtype))
    ids[:, 0], ids[:, 1] = 2, 2  # one expert twice in a token's ids: both terms added
    ids[1, 2] = 5
    torch.testing.assert_close(native.moe_decode(x, w13, w2, weights, ids).float(),
                               moe.moe_experts(x, w13, w2, weights, ids).float(), **TOL[dtype])


def test_expert_id_out_of_range():
    x, w13, w2, weights, ids = _inputs(3, 2, 32, 16, 4, torch.float32, seed=5)
    ids[1, 1] = 4
    with pytest.raises(RuntimeError, match="out of range"):
        native.moe_decode(x, w13, w2, weights, ids)


def test_declines_what_it_does_not_take():
    x, w13, w2, weights, ids = _inputs(3, 2, 32, 16, 4, torch.float32, seed=6)
    assert native.moe_decode(x.bfloat16(), w13, w2, weights, ids) is None  # mixed dtypes
    assert native.moe_decode(x.half(), w13.half(), w2.half(), weights, ids) is None
    assert native.moe_decode(x, w13.transpose(1, 2).contiguous().transpose(1, 2), w2, weights, ids) is None
    assert native.moe_decode(x[:, :16], w13, w2, weights, ids) is None
    assert native.moe_decode(x, w13.requires_grad_(), w2, weights, ids) is None  # training: no autograd here
    with torch.no_grad():
        assert native.moe_decode(x, w13, w2, weights, ids) is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dispatch_at_decode_sizes_only(monkeypatch, dtype):
    calls = []
    real = native.moe_decode
    monkeypatch.setattr(native, "moe_decode", lambda *a: calls.append(a[4].numel()) or real(*a))
    x, w13, w2, weights, ids = _inputs(64, 4, 96, 48, 8, dtype, seed=7)
    got = kernels.moe_experts(x, w13, w2, weights, ids)
    assert calls == [256]
    torch.testing.assert_close(got.float(), moe.moe_experts(x, w13, w2, weights, ids).float(), **TOL[dtype])
    x, w13, w2, weights, ids = _inputs(300, 4, 96, 48, 8, dtype, seed=8)  # 1200 pairs: a prefill step
    got = kernels.moe_experts(x, w13, w2, weights, ids)
    assert calls == [256]
    assert torch.equal(got, moe.moe_experts_cpu(x, w13, w2, weights, ids))


@pytest.mark.parametrize("env", [("P2M_CPU_NATIVE_MOE", "0"), ("P2M_CPU_NATIVE", "0")])
def test_disabled_falls_back(monkeypatch, env):
    """Turned off (either switch): the torch path, exactly as before."""
    monkeypatch.setenv(*env)
    native.set_enabled(None)
    native.set_moe_enabled(None)
    try:
        assert not native.moe_enabled()
        x, w13, w2, weights, ids = _inputs(16, 4, 96, 48, 8, torch.float32, seed=9)
        assert native.moe_decode(x, w13, w2, weights, ids) is None
        assert torch.equal(kernels.moe_experts(x, w13, w2, weights, ids), moe.moe_experts_cpu(x, w13, w2, weights, ids))
    finally:
        monkeypatch.delenv(env[0])
        native.set_enabled(None)
        native.set_moe_enabled(None)
    assert native.moe_enabled()


def test_no_compiler_falls_back(failing_compiler):
    """A compiler that fails (or none): no library, and the torch path still answers."""
    assert native.moe_enabled() and not native.moe_available()
    x, w13, w2, weights, ids = _inputs(4, 4, 64, 32, 6, torch.float32, seed=10)
    assert native.moe_decode(x, w13, w2, weights, ids) is None
    assert torch.equal(kernels.moe_experts(x, w13, w2, weights, ids), moe.moe_experts_cpu(x, w13, w2, weights, ids))
