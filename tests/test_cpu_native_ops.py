"""The native CPU add + RMSNorm and router (param2moe/kernels/cpu/decode_ops.c) against their torch oracles
(kernels/norm.py, kernels/routing.py), and their dispatch from kernels/__init__.py."""

from __future__ import annotations

import pytest
import torch

from param2moe.kernels import Kernels, norm, routing
from param2moe.kernels import cpu as native

pytestmark = pytest.mark.skipif(native._ops_lib() is None, reason="no C compiler (or the native kernels failed)")

# fp32: the same operations, the sum of squares in another order. bf16: a value at a rounding boundary lands an
# ulp (2^-8 relative) away.
TOL = {torch.float32: dict(atol=1e-6, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=8e-3)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t,h", [(1, 512), (7, 96), (33, 100)])
def test_add_rms_norm(dtype, w_dtype, t, h):
    g = torch.Generator().manual_seed(t + h)
    x, res = torch.randn(t, h, generator=g).to(dtype), torch.randn(t, h, generator=g).to(dtype)
    w = (torch.rand(h, generator=g) + 0.5).to(w_dtype)
    normed, r = native.add_rms_norm(x, res, w, 1e-6)
    want_normed, want_r = norm.add_rms_norm(x, res, w, 1e-6)
    assert normed.dtype == dtype and torch.equal(r, want_r)  # the add: one rounding, the same
    torch.testing.assert_close(normed, want_normed, **TOL[dtype])
    plain, none = native.add_rms_norm(x, None, w, 1e-6)
    assert none is None
    torch.testing.assert_close(plain, norm.rms_norm(x, w, 1e-6), **TOL[dtype])


ROUTINGS = [
    dict(),
    dict(score_function="softmax"),
    dict(n_group=4, topk_group=2),
    dict(norm_topk_prob=False, routed_scaling_factor=2.5),
    dict(num_appended=2),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kw", ROUTINGS)
def test_gate_route(dtype, bias, kw):
    t, h, e, k = 24, 256, 16, 4
    g = torch.Generator().manual_seed(7)
    x = torch.randn(t, h, generator=g).to(dtype)
    gate = torch.randn(e, h, generator=g) / h ** 0.5
    b = torch.randn(e, generator=g) * 0.1 if bias else None
    weights, ids = native.gate_route(x, gate, b, k, **kw)
    want_w, want_ids = routing.gate_route(x, gate, b, k, **kw)
    # the same experts in the same order (descending choice score): random scores have no near ties here
    assert torch.equal(ids, want_ids) and ids.dtype == torch.int64
    torch.testing.assert_close(weights, want_w, atol=1e-6, rtol=1e-5)


def test_gate_route_declines():
    x, gate = torch.randn(2, 64), torch.randn(8, 64)
    assert native.gate_route(x, gate.bfloat16(), None, 2) is None  # the router is fp32
    assert native.gate_route(x, gate, None, 2, n_group=3, topk_group=1) is None  # 8 experts, 3 groups
    assert native.gate_route(x, gate, None, 2, score_function="sqrt") is None


def test_dispatch_matches_the_torch_path():
    """kernels.add_rms_norm_gate_route / rms_norm on CPU tensors: native by default, torch with the backend
    "torch"; the same results."""
    g = torch.Generator().manual_seed(3)
    x, res = torch.randn(5, 128, generator=g).bfloat16(), torch.randn(5, 128, generator=g).bfloat16()
    w, gate, b = torch.rand(128, generator=g).bfloat16(), torch.randn(16, 128, generator=g), torch.rand(16)
    out = [kern.add_rms_norm_gate_route(x, res, w, 1e-6, gate, b, 4, n_group=4, topk_group=2,
                                        routed_scaling_factor=2.5) for kern in (Kernels("auto"), Kernels("torch"))]
    (n1, r1, w1, i1, _), (n2, r2, w2, i2, _) = out
    torch.testing.assert_close(n1, n2, **TOL[torch.bfloat16])
    assert torch.equal(r1, r2) and torch.equal(i1, i2)
    torch.testing.assert_close(w1, w2, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t,k,n", [(1, 512, 768), (2, 96, 40), (3, 80, 13)])
def test_dense_linear(dtype, t, k, n, native_path):
    """cpu/moe_decode.c's tiles as a linear layer (with a bias; float32 out for the head) against F.linear in
    float32: the same products summed in another order, one rounding at the end for bf16."""
    g = torch.Generator().manual_seed(t * k)
    x, w, b = (torch.randn(t, k, generator=g).to(dtype), (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype),
               torch.randn(n, generator=g).to(dtype))
    want = torch.nn.functional.linear(x.float(), w.float(), b.float())
    got = native.dense_linear(x, w, b)
    assert got.dtype == dtype and got.shape == (t, n)
    torch.testing.assert_close(got.float(), want, **TOL[dtype])
    torch.testing.assert_close(native.dense_linear(x, w, out_dtype=torch.float32), want - b.float(),
                               atol=1e-5, rtol=1e-5)


def test_small_batch_dispatch_matches_the_torch_path():
    """kernels.linear / mlp / logits with one or two rows on the CPU (native tiles) against the backend "torch"
    (oneDNN); more rows stay on oneDNN."""
    g = torch.Generator().manual_seed(9)
    w = (torch.randn(96, 64, generator=g) / 8).bfloat16()
    gate_up, down = (torch.randn(80, 64, generator=g) / 8).bfloat16(), (torch.randn(64, 40, generator=g) / 6).bfloat16()
    for t in (1, 2, 5):
        x = torch.randn(t, 64, generator=g).bfloat16()
        out = [(k.linear(x, w), k.mlp(x, gate_up, down), k.logits(x, w)) for k in (Kernels("auto"), Kernels("torch"))]
        for got, want in zip(*out):
            assert got.dtype == want.dtype
            torch.testing.assert_close(got.float(), want.float(), **TOL[torch.bfloat16])
