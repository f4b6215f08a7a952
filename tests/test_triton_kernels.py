"""The Triton kernels (param2moe/kernels/triton/) against their plain torch oracles.

Runs on CUDA when a GPU is there, else on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1,
small shapes); skipped when triton is not installed. Every check draws fresh random inputs, poisons
what the kernels allocate (NaN for floats, a wild value for ints) so an element never written shows,
and compares fp32 tightly and bf16 within bf16 rounding.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from cases import ROUTE_CASES as SHARED_ROUTE_CASES

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from param2moe.kernels import attention as ref_attn  # noqa: E402
from param2moe.kernels import embedding as ref_embedding  # noqa: E402
from param2moe.kernels import moe as ref_moe  # noqa: E402
from param2moe.kernels import norm as ref_norm  # noqa: E402
from param2moe.kernels import rope as ref_rope  # noqa: E402
from param2moe.kernels import routing as ref_routing  # noqa: E402
from param2moe.kernels.triton import attention as tri_attn  # noqa: E402
from param2moe.kernels.triton import embedding as tri_embedding  # noqa: E402
from param2moe.kernels.triton import gemv as tri_gemv  # noqa: E402
from param2moe.kernels.triton import moe as tri_moe  # noqa: E402
from param2moe.kernels.triton import norm as tri_norm  # noqa: E402
from param2moe.kernels.triton import routing as tri_routing  # noqa: E402
from param2moe.kernels.triton import sampling as tri_sampling  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
BIG = CUDA or os.environ.get("P2M_TEST_BIG") == "1"  # real Param2 shapes too (slow under the interpreter)

_real_empty, _real_empty_like = torch.empty, torch.empty_like


def _poison(t):
    if t.is_floating_point():
        t.fill_(float("nan"))
    elif t.dtype != torch.bool:
        t.fill_(-123456789 if t.dtype in (torch.int32, torch.int64) else 0x7F)
    return t


@contextlib.contextmanager
def poisoned():
    """torch.empty / empty_like return poisoned tensors inside (outputs and scratch of the kernels)."""
    torch.empty = lambda *a, **k: _poison(_real_empty(*a, **k))
    torch.empty_like = lambda *a, **k: _poison(_real_empty_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = _real_empty, _real_empty_like


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check(out, ref, dtype, tight=1e-5, loose=8e-3):
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all(), "non-finite output (an element never written?)"
    err = rel_err(out, ref)
    if not CUDA:  # the interpreter rounds every fp32 -> bf16 toward zero: a bias that adds up over stages
        loose = max(loose, 4e-2)
    assert err < (tight if dtype == torch.float32 else loose), f"rel err {err:.3g}"


DTYPES = [torch.float32, torch.bfloat16]


# ------------------------------------------------------------------------------------ norms
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2048), (7, 2048), (33, 64), (5, 3, 96)])
def test_rms_norm(dtype, shape):
    x = torch.randn(*shape, device=DEV).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], device=DEV)).to(dtype)
    with poisoned():
        out = tri_norm.rms_norm(x, w, 1e-6)
    check(out, ref_norm.rms_norm(x, w, 1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_strided_rows(dtype):
    base = torch.randn(9, 3 * 128, device=DEV).to(dtype)
    x = base[:, 128:256]  # rows strided, last dim contiguous
    w = torch.randn(128, device=DEV).to(dtype)
    with poisoned():
        out = tri_norm.rms_norm(x, w, 1e-5)
    check(out, ref_norm.rms_norm(x, w, 1e-5), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [1, 13])
def test_add_rms_norm(dtype, t):
    h = 2048
    x, r = torch.randn(t, h, device=DEV).to(dtype), torch.randn(t, h, device=DEV).to(dtype)
    w = (1 + 0.1 * torch.randn(h, device=DEV)).to(dtype)
    with poisoned():
        out, res = tri_norm.add_rms_norm(x, r, w, 1e-6)
    ref_out, ref_res = ref_norm.add_rms_norm(x, r, w, 1e-6)
    if CUDA or dtype == torch.float32:
        assert torch.equal(res, ref_res)  # the rounded sum is exact
    else:  # the interpreter rounds fp32 -> bf16 toward zero, not to nearest
        torch.testing.assert_close(res, ref_res, rtol=1e-2, atol=1e-2)
    check(out, ref_out, dtype)


# ------------------------------------------------------------------------------------ decode GEMV
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t,n,k", [(1, 3072, 2048), (4, 100, 96), (3, 48, 512)])
def test_gemv(t, n, k, dtype):
    x = torch.randn(t, k, device=DEV).to(dtype)
    w = (torch.randn(n, k, device=DEV) / k**0.5).to(dtype)
    assert tri_gemv.fits(x, w, None) and not tri_gemv.fits(x, w, torch.zeros(n, device=DEV, dtype=dtype))
    assert not tri_gemv.fits(x.new_zeros(tri_gemv.MAX_TOKENS + 1, k), w, None)  # more tokens: cuBLAS
    assert tri_gemv.usable(x, w, None) == (CUDA and torch.cuda.get_device_capability()[0] >= 9)
    with poisoned():
        out = tri_gemv.gemv(x, w)
    ref = (x.float() @ w.float().T).to(dtype)
    check(out, ref, torch.bfloat16, loose=1e-2)


@pytest.mark.parametrize("t", [1, 3])
def test_gemv_streaming_fp32_out(t):
    """The head's form: a weight streamed through programs of STREAM_BLOCK_N rows, float32 logits (the fp32
    accumulator, not rounded to bf16)."""
    x = torch.randn(t, 256, device=DEV).to(torch.bfloat16)
    w = (torch.randn(1000, 256, device=DEV) / 16).to(torch.bfloat16)
    with poisoned():
        out = tri_gemv.gemv(x, w, out_dtype=torch.float32, block_n=tri_gemv.STREAM_BLOCK_N)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x.float() @ w.float().T, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- QK-norm + RoPE
def _cos_sin(t, half, device):
    pos = torch.randint(0, 4096, (t,), device=device).float()
    inv = 1e6 ** (-torch.arange(half, device=device).float() / half)
    ang = pos[:, None] * inv[None, :]
    return ang.cos(), ang.sin()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_norm", [True, False])
@pytest.mark.parametrize("d,rot", [(64, 64), (64, 32), (48, 48)])
def test_qk_norm_rope(dtype, with_norm, d, rot):
    t, nh, nkv = 11, 8, 2
    qkv = torch.randn(t, (nh + 2 * nkv) * d, device=DEV).to(dtype)
    q, k, _ = qkv.split([nh * d, nkv * d, nkv * d], dim=-1)  # strided views, as the network has them
    q, k = q.reshape(t, nh, d), k.reshape(t, nkv, d)
    qw = (1 + 0.2 * torch.randn(d, device=DEV)).to(dtype) if with_norm else None
    kw = (1 + 0.2 * torch.randn(d, device=DEV)).to(dtype) if with_norm else None
    cos, sin = _cos_sin(t, rot // 2, DEV)
    with poisoned():
        qo, ko = tri_norm.qk_norm_rope(q, k, qw, kw, cos, sin, 1e-6)
    rq, rk = ref_rope.qk_norm_rope(q, k, qw, kw, cos, sin, 1e-6)
    check(qo, rq, dtype)
    check(ko, rk, dtype)
    if not with_norm:
        with poisoned():
            check(tri_norm.apply_rope(q, cos, sin), ref_rope.apply_rope(q, cos, sin), dtype)


# ------------------------------------------------------------------------------------ routing
ROUTE_CASES = {**SHARED_ROUTE_CASES, "grouped-three-groups": dict(n_group=3, topk_group=2)}  # 48 experts, below


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("name", list(ROUTE_CASES))
def test_route(name, with_bias):
    kw = ROUTE_CASES[name]
    e = 48 if name == "grouped-three-groups" else 64
    t = 37
    logits = torch.randn(t, e, device=DEV) * 2
    bias = torch.randn(e, device=DEV) * 0.5 if with_bias else None
    with poisoned():
        w, ids = tri_routing.route(logits, bias, 6, **kw)
    rw, rids = ref_routing.route(logits, bias, 6, **kw)
    assert ids.dtype == torch.int64 and w.dtype == torch.float32
    assert torch.equal(ids, rids), (ids, rids)
    torch.testing.assert_close(w, rw, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["param2", "grouped-softmax-scaled"])
def test_route_with_appended_shared_experts(name):
    """Two more columns per token: experts E and E+1 (the folded shared expert) with weight 1; the
    routed weights normalised over the routed experts alone."""
    kw = ROUTE_CASES[name]
    logits, bias = torch.randn(21, 64, device=DEV) * 2, torch.randn(64, device=DEV) * 0.5
    with poisoned():
        w, ids = tri_routing.route(logits, bias, 6, num_appended=2, **kw)
    rw, rids = ref_routing.route(logits, bias, 6, num_appended=2, **kw)
    assert ids.shape == (21, 8) and torch.equal(ids, rids)
    assert ids[:, 6:].tolist() == [[64, 65]] * 21 and w[:, 6:].eq(1).all()
    torch.testing.assert_close(w, rw, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w[:, :6], ref_routing.route(logits, bias, 6, **kw)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [1, 5, 16, 40])
@pytest.mark.parametrize("name", ["param2", "grouped-softmax-scaled"])
def test_gate_route(name, t, dtype):
    """Router logits + routing (one fused launch up to 16 tokens, then logits + the routing kernel), twice in a
    row (the fused kernel's counter must be back at zero), against the oracle."""
    kw = dict(ROUTE_CASES[name])
    h, e = 512, 64
    gate = torch.randn(e, h, device=DEV) / h**0.5
    bias = 0.1 * torch.randn(e, device=DEV)
    for _ in range(2):
        x = torch.randn(t, h, device=DEV).to(dtype)
        with poisoned():
            w, ids = tri_routing.gate_route(x, gate, bias, 6, num_appended=2, **kw)
        rw, rids = ref_routing.gate_route(x, gate, bias, 6, num_appended=2, **kw)
        assert torch.equal(ids, rids)
        torch.testing.assert_close(w, rw, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [1, 5, 16, 40])
def test_add_rms_norm_gate_route(t, dtype):
    """The post-attention norm computed inside the router's launch (up to 16 tokens; beyond, the two
    kernels): normed rows, new residual, weights and ids as add_rms_norm then gate_route give them."""
    h, e = 512, 64
    gate = torch.randn(e, h, device=DEV) / h**0.5
    bias = 0.1 * torch.randn(e, device=DEV)
    nw = (1 + 0.1 * torch.randn(h, device=DEV)).to(dtype)
    for _ in range(2):
        a, r = torch.randn(t, h, device=DEV).to(dtype), torch.randn(t, h, device=DEV).to(dtype)
        with poisoned():
            xn, res, w, ids = tri_routing.add_rms_norm_gate_route(a, r, nw, 1e-6, gate, bias, 6, num_appended=2,
                                                                  routed_scaling_factor=2.5)
        rxn, rres, rw, rids = ref_routing.add_rms_norm_gate_route(a, r, nw, 1e-6, gate, bias, 6, num_appended=2,
                                                                  routed_scaling_factor=2.5)
        if CUDA or dtype == torch.float32:
            assert torch.equal(res, rres)
        check(xn, rxn, dtype)
        # the router reads the normed rows; the oracle's on its own rounding of them: route those
        w2, ids2 = ref_routing.gate_route(xn, gate, bias, 6, num_appended=2, routed_scaling_factor=2.5)
        assert torch.equal(ids, ids2)
        torch.testing.assert_close(w, w2, rtol=1e-5, atol=1e-6)
        if dtype == torch.float32:
            assert torch.equal(ids, rids)
            torch.testing.assert_close(w, rw, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_gate_route_whole_row_equals_two_passes(dtype, monkeypatch):
    """One token whose row fits one block: the router's inputs loaded at once (ROUTER_WHOLE_ROW) give the
    two-pass launch's normed row, residual, weights and ids exactly."""
    h, e = 512, 64
    gate = torch.randn(e, h, device=DEV) / h**0.5
    nw = (1 + 0.1 * torch.randn(h, device=DEV)).to(dtype)
    a, r = torch.randn(1, h, device=DEV).to(dtype), torch.randn(1, h, device=DEV).to(dtype)
    outs = []
    for whole in (True, False):
        monkeypatch.setattr(tri_routing, "ROUTER_WHOLE_ROW", whole)
        with poisoned():
            outs.append(tri_routing.add_rms_norm_gate_route(a, r, nw, 1e-6, gate, None, 6, num_appended=2))
    for one, two in zip(*outs):
        assert torch.equal(one, two)


def test_route_bias_decides_choice_only():
    logits = torch.zeros(4, 64, device=DEV)
    bias = torch.zeros(64, device=DEV)
    bias[[3, 9, 27, 40, 50, 63]] = 1.0
    w, ids = tri_routing.route(logits, bias, 6, routed_scaling_factor=2.5)
    assert sorted(ids[0].tolist()) == [3, 9, 27, 40, 50, 63]
    torch.testing.assert_close(w, torch.full_like(w, 2.5 / 6))


# ------------------------------------------------------------------------------------ MoE
def _moe_inputs(t, e, h, i, k, dtype, with_missing=False):
    x = torch.randn(t, h, device=DEV).to(dtype)
    w13 = (torch.randn(e, 2 * i, h, device=DEV) / h**0.5).to(dtype)
    w2 = (torch.randn(e, h, i, device=DEV) / i**0.5).to(dtype)
    ids = torch.rand(t, e, device=DEV).topk(k, dim=-1).indices  # distinct experts per token, uniform
    if with_missing:
        ids[torch.rand(t, k, device=DEV) < 0.2] = -1
    weights = torch.rand(t, k, device=DEV)
    return x, w13, w2, weights, ids


@pytest.mark.parametrize("t,k,block_m,e", [(1, 6, 16, 16), (5, 2, 16, 16), (40, 6, 32, 16), (100, 6, 64, 16),
                                           (200, 6, 16, 16), (300, 6, 64, 16), (64, 8, 16, 66), (200, 8, 16, 66)])
def test_moe_align(t, k, block_m, e):
    ids = torch.rand(t, e, device=DEV).topk(k, dim=-1).indices
    ids[torch.rand(t, k, device=DEV) < 0.1] = -1
    with poisoned():
        sorted_ids, expert_ids, num_post = tri_moe.moe_align(ids, e, block_m)
    n = int(num_post)
    flat = ids.reshape(-1).cpu()
    counts = torch.bincount(flat[flat >= 0], minlength=e)
    assert n == int(((counts + block_m - 1) // block_m * block_m).sum())
    s = sorted_ids[:n].cpu().long()
    ex = expert_ids.cpu().long()
    real = s[s < t * k]
    assert sorted(real.tolist()) == [p for p in range(t * k) if flat[p] >= 0]  # each valid pair once
    assert (s[s >= t * k] == t * k).all()  # padding slots hold the sentinel
    for slot in range(n):
        if s[slot] < t * k:
            assert flat[s[slot]] == ex[slot // block_m]


MOE_CASES = [
    # t, e, h, i, k, missing, config
    (1, 8, 64, 32, 2, False, None),
    (3, 8, 64, 48, 3, True, None),
    (37, 8, 96, 64, 4, True, {"BLOCK_M": 32, "gate_up": dict(BLOCK_N=32, BLOCK_K=64, GROUP_M=4, num_warps=4,
                                                                num_stages=2),
                              "down": dict(BLOCK_N=64, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=2)}),
    (100, 8, 64, 32, 6, True, None),
    (190, 8, 64, 32, 6, True, None),  # > SMALL_ALIGN_MAX_PAIRS: the three-kernel align
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(MOE_CASES)))
def test_moe_experts(dtype, case):
    t, e, h, i, k, missing, cfg = MOE_CASES[case]
    x, w13, w2, weights, ids = _moe_inputs(t, e, h, i, k, dtype, missing)
    with poisoned():
        out = tri_moe.moe_experts(x, w13, w2, weights, ids, config=cfg)
    check(out, ref_moe.moe_experts(x, w13, w2, weights, ids), dtype, tight=2e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_moe_one_token_without_align_and_missing_ids(dtype):
    x, w13, w2, weights, ids = _moe_inputs(1, 8, 64, 32, 4, dtype)
    ids[0, 2] = -1  # an expert held by another rank: contributes nothing
    with poisoned():
        out = tri_moe.moe_experts(x, w13, w2, weights, ids)
    check(out, ref_moe.moe_experts(x, w13, w2, weights, ids), dtype, tight=2e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [96, 2600])
def test_one_token_mlp_as_one_expert(width, dtype):
    """A dense MLP at one token runs the one-token expert GEMVs as a single expert of its whole width (ops.mlp),
    the down rows in chunks when the width passes one chunk; unsummed, the pair's row is the MLP's output."""
    x = torch.randn(1, 64, device=DEV).to(dtype)
    gate_up = (torch.randn(2 * width, 64, device=DEV) / 8).to(dtype)
    down = (torch.randn(64, width, device=DEV) / width**0.5).to(dtype)
    one, zero = torch.ones(1, 1, device=DEV), torch.zeros(1, 1, dtype=torch.long, device=DEV)
    with poisoned():
        out = tri_moe.moe_experts(x, gate_up[None], down[None], one, zero, unsummed=True)
    gate, up = (x.float() @ gate_up.float().T).to(dtype).chunk(2, dim=-1)
    ref = ((torch.nn.functional.silu(gate.float()).to(dtype) * up).float() @ down.float().T).to(dtype)
    check(out, ref, dtype, tight=2e-5)


def test_moe_experts_one_weight_row_expanded():
    """The benchmarks' uniform routing hands one row of weights expanded over the tokens (stride 0)."""
    x, w13, w2, _, ids = _moe_inputs(5, 8, 64, 32, 3, torch.float32)
    weights = torch.rand(1, 3, device=DEV).expand(5, -1)
    with poisoned():
        out = tri_moe.moe_experts(x, w13, w2, weights, ids)
    check(out, ref_moe.moe_experts(x, w13, w2, weights.contiguous(), ids), torch.float32, tight=2e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_choice", [False, True])
def test_gate_up_launched_behind_the_router(with_choice, dtype):
    """One token, the shared expert folded in as the last 2 experts: the experts' gate/up launched behind
    the router (the shared blocks norm the row themselves, the routed ones read the router's row and ids,
    or the given choice's) gives the fused MoE's outputs, and the oracle's on the router's normed row."""
    h, i, e, k = 256, 64, 16, 4
    gate = torch.randn(e, h, device=DEV) / h**0.5
    bias = 0.1 * torch.randn(e, device=DEV)
    nw = (1 + 0.1 * torch.randn(h, device=DEV)).to(dtype)
    _, w13, w2, _, _ = _moe_inputs(1, e + 2, h, i, k, dtype)
    kw = dict(num_appended=2, routed_scaling_factor=2.5)
    for _ in range(2):
        a, r = torch.randn(1, h, device=DEV).to(dtype), torch.randn(1, h, device=DEV).to(dtype)
        choice = None
        if with_choice:
            picks = torch.cat([torch.randperm(e, device=DEV)[:k], torch.tensor([e, e + 1], device=DEV)])
            choice = (torch.rand(1, k + 2, device=DEV), picks[None])
        with poisoned():
            xn, res, w, ids, started = tri_moe.add_rms_norm_gate_route_gate_up(a, r, nw, 1e-6, gate, bias, k, w13,
                                                                               choice, overlap=True, **kw)
            assert started is not None
            pair_out = tri_moe.moe_experts(xn, w13, w2, w, ids, unsummed=True, started=started)
        xn2, res2, w2_, ids2 = tri_routing.add_rms_norm_gate_route(a, r, nw, 1e-6, gate, bias, k, **kw)
        assert torch.equal(res, res2) and torch.equal(xn, xn2)
        assert torch.equal(ids, choice[1] if with_choice else ids2) and ids[0, k:].tolist() == [e, e + 1]
        plain = tri_moe.moe_experts(xn, w13, w2, w, ids, unsummed=True)
        check(pair_out, plain, dtype)
        y = tri_norm.expert_sum_add_rms_norm(pair_out, w, ids, res, nw, 1e-6)[1]
        check(y, ref_norm.add_rms_norm(ref_moe.moe_experts(xn, w13, w2, w, ids), res, nw, 1e-6)[1], dtype)
    # more than one token: nothing launched early
    a2 = torch.randn(3, h, device=DEV).to(dtype)
    assert tri_moe.add_rms_norm_gate_route_gate_up(a2, a2, nw, 1e-6, gate, bias, k, w13, overlap=True, **kw)[4] is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [1, 6, 37])
def test_unsummed_moe_then_expert_sum_add_rms_norm(t, dtype):
    """The MoE stopped before its combine, summed inside the next add + RMSNorm (ids -1 skipped, one
    weight row expanded over the tokens as the benchmarks hand it)."""
    h = 96
    x, w13, w2, _, ids = _moe_inputs(t, 8, h, 32, 4, dtype, with_missing=True)
    weights = torch.rand(1, 4, device=DEV).expand(t, -1)
    r = torch.randn(t, h, device=DEV).to(dtype)
    nw = (1 + 0.1 * torch.randn(h, device=DEV)).to(dtype)
    with poisoned():
        pair_out = tri_moe.moe_experts(x, w13, w2, weights, ids, unsummed=True)
        out, res = tri_norm.expert_sum_add_rms_norm(pair_out, weights, ids, r, nw, 1e-6)
    assert pair_out.shape == (t * 4, h)
    summed = tri_moe.moe_experts(x, w13, w2, weights, ids)
    ref_out, ref_res = ref_norm.add_rms_norm(summed, r, nw, 1e-6)  # the combine kernel's sum, then the norm
    check(res, ref_res, dtype)  # the fp32 sums may contract to FMAs differently: equal to rounding only
    check(out, ref_out, dtype)
    want = ref_norm.expert_sum_add_rms_norm(pair_out, weights, ids, r, nw, 1e-6)[0]  # the oracle on the same pairs
    check(out, want, dtype)


@pytest.mark.skipif(not BIG, reason="real Param2 shapes: CUDA (or P2M_TEST_BIG=1)")
@pytest.mark.parametrize("t", [1, 8, 64, 300])
def test_moe_experts_param2_shapes(t):
    x, w13, w2, weights, ids = _moe_inputs(t, 64, 2048, 2048, 6, torch.bfloat16)
    with poisoned():
        out = tri_moe.moe_experts(x, w13, w2, weights, ids)
    check(out, ref_moe.moe_experts(x, w13, w2, weights, ids), torch.bfloat16)


# ------------------------------------------------------------------------------------ attention
def _paged_batch(q_lens, ctx_lens, nh, nkv, d, dtype, num_blocks=None, page=16):
    """A batch over a paged cache with random block tables and NaN garbage in every unused slot."""
    b = len(q_lens)
    need = [-(-c // page) for c in ctx_lens]
    width = max(need) + 1
    num_blocks = num_blocks or sum(need) + 3
    k_cache = torch.full((num_blocks, page, nkv, d), float("nan"), device=DEV).to(dtype)
    v_cache = torch.full((num_blocks, page, nkv, d), float("nan"), device=DEV).to(dtype)
    perm = torch.randperm(num_blocks).tolist()
    tables = torch.full((b, width), -1, dtype=torch.int32)
    used = 0
    for s, n in enumerate(need):
        tables[s, :n] = torch.tensor(perm[used:used + n], dtype=torch.int32)
        used += n
        for j in range(ctx_lens[s]):
            blk, off = int(tables[s, j // page]), j % page
            k_cache[blk, off] = torch.randn(nkv, d, device=DEV).to(dtype)
            v_cache[blk, off] = torch.randn(nkv, d, device=DEV).to(dtype)
    qsl = torch.zeros(b + 1, dtype=torch.int64)
    qsl[1:] = torch.tensor(q_lens).cumsum(0)
    q = torch.randn(int(qsl[-1]), nh, d, device=DEV).to(dtype)
    return q, k_cache, v_cache, tables.to(DEV), torch.tensor(ctx_lens, dtype=torch.int32, device=DEV), qsl.to(DEV)


ATTN_CASES = {
    "decode": ([1, 1, 1], [5, 40, 17], 8, 2, 64),
    "decode-long": ([1, 1], [300, 129], 8, 2, 64),
    "decode-mha": ([1, 1], [33, 70], 4, 4, 32),
    "prefill": ([23, 7], [23, 7], 8, 2, 64),
    "prefill-one": ([37], [37], 8, 2, 64),
    "chunked-mixed": ([9, 1, 20, 1], [50, 33, 20, 1], 8, 2, 64),
    "gqa3": ([5, 1], [45, 18], 6, 2, 64),
    "d48": ([3, 1], [19, 64], 4, 1, 48),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("splits", [None, 1, 3])
@pytest.mark.parametrize("name", list(ATTN_CASES))
def test_paged_attention(name, splits, dtype):
    _paged_attention_check(name, splits, dtype)


@pytest.mark.parametrize("speculate", [True, False])
@pytest.mark.parametrize("splits", [2, 3])
@pytest.mark.parametrize("name", ["decode", "decode-long", "decode-mha"])
def test_paged_attention_decode_split_walks(name, splits, speculate, monkeypatch):
    """Decode with a split walk, attention.DECODE_SPECULATE on (the default) and off: decode-long's 300 tokens are
    3 tiles, so with 2 splits the walk is not a tile a split and the speculated pages are read again."""
    monkeypatch.setattr(tri_attn, "DECODE_SPECULATE", speculate)
    _paged_attention_check(name, splits, torch.float32)


def _paged_attention_check(name, splits, dtype):
    q_lens, ctx_lens, nh, nkv, d = ATTN_CASES[name]
    q, kc, vc, tables, ctx, qsl = _paged_batch(q_lens, ctx_lens, nh, nkv, d, dtype)
    scale = d**-0.5
    args = (q, kc, vc, tables, ctx, qsl, scale, max(q_lens), max(ctx_lens))
    cfg = None
    if max(q_lens) > 1:
        cfg = dict(BLOCK_Q=4, BLOCK_N=32, num_warps=4, num_stages=2)  # several q-blocks a sequence
    with poisoned():
        out = tri_attn.paged_attention(*args, num_splits=splits, config=cfg)
    check(out, ref_attn.paged_attention(*args), dtype, tight=2e-5, loose=1.2e-2)


@pytest.mark.parametrize("splits", [None, 3])
def test_paged_attention_token_graph_layout(splits):
    """A token graph's batch (engine/cuda_graphs.py): the rows past the step's tokens form one more sequence
    with no context, whose attention is zero (not garbage: it feeds the padding rows' MoE), and the
    sequences after it are empty; the real rows are as without the padding."""
    q_lens, ctx_lens, nh, nkv, d = [9, 1, 20], [50, 33, 20], 8, 2, 64
    q, kc, vc, tables, ctx, qsl = _paged_batch(q_lens, ctx_lens, nh, nkv, d, torch.float32)
    t, pad, empty = q.shape[0], 11, 3
    qp = torch.cat([q, torch.randn(pad, nh, d, device=DEV)])
    tables_p = torch.cat([tables, torch.full((1 + empty, tables.shape[1]), 7, dtype=tables.dtype, device=DEV)])
    ctx_p = torch.cat([ctx, torch.zeros(1 + empty, dtype=ctx.dtype, device=DEV)])
    qsl_p = torch.cat([qsl, torch.full((1 + empty,), t + pad, dtype=qsl.dtype, device=DEV)])
    cfg = dict(BLOCK_Q=4, BLOCK_N=32, num_warps=4, num_stages=2)
    with poisoned():
        out = tri_attn.paged_attention(qp, kc, vc, tables_p, ctx_p, qsl_p, d**-0.5, t + pad, 4096,
                                       num_splits=splits, config=cfg)
    ref = ref_attn.paged_attention(q, kc, vc, tables, ctx, qsl, d**-0.5, max(q_lens), max(ctx_lens))
    check(out[:t], ref, torch.float32, tight=2e-5)
    assert torch.equal(out[t:], torch.zeros_like(out[t:]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_qk_norm_rope_writes_the_kv_cache(dtype):
    """The fused KV write: k (normed, rotated) and v at each token's slot, slot -1 skipped, nothing else touched."""
    t, nh, nkv, d, nb = 9, 4, 2, 64, 6
    qkv = torch.randn(t, (nh + 2 * nkv) * d, device=DEV).to(dtype)
    q, k, v = qkv.split([nh * d, nkv * d, nkv * d], dim=-1)
    q, k, v = q.reshape(t, nh, d), k.reshape(t, nkv, d), v.reshape(t, nkv, d)
    qw, kw = (1 + 0.2 * torch.randn(d, device=DEV)).to(dtype), (1 + 0.2 * torch.randn(d, device=DEV)).to(dtype)
    cos, sin = _cos_sin(t, d // 2, DEV)
    slots = torch.randperm(nb * 16, device=DEV)[:t]
    slots[3] = -1
    kc, vc = torch.randn(nb, 16, nkv, d, device=DEV).to(dtype), torch.randn(nb, 16, nkv, d, device=DEV).to(dtype)
    kc2, vc2 = kc.clone(), vc.clone()
    with poisoned():
        qo, ko = tri_norm.qk_norm_rope(q, k, qw, kw, cos, sin, 1e-6, (v, kc, vc, slots))
    keep = slots >= 0
    rq, rk = ref_rope.qk_norm_rope(q, k, qw, kw, cos, sin, 1e-6)
    ref_attn.write_kv_cache(ko[keep], v[keep], kc2, vc2, slots[keep])  # the kernel's own k, rounded the same
    check(qo, rq, dtype)
    check(ko, rk, dtype)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_norm", [True, False])
@pytest.mark.parametrize("splits,speculate", [(None, False), (1, False), (3, False), (2, True), (3, True)])
@pytest.mark.parametrize("name,rot", [("decode", 64), ("decode-long", 32), ("gqa3", 64), ("chunked-mixed", 64)])
def test_paged_attention_with_norm_rope_and_cache_write(name, rot, splits, speculate, with_norm, dtype, monkeypatch):
    """q and k as projected: QK-norm + RoPE and the KV write inside the decode attention's launch (before
    it otherwise), against the oracle composition; the cache ends as qk_norm_rope's write leaves it, the
    padding row's slot -1 untouched. speculate: attention.DECODE_SPECULATE."""
    q_lens, ctx_lens, nh, nkv, d = ATTN_CASES[name]
    if speculate and max(q_lens) > 1:
        pytest.skip("the speculated walk is decode's")
    monkeypatch.setattr(tri_attn, "DECODE_SPECULATE", speculate)
    q, kc, vc, tables, ctx, qsl = _paged_batch(q_lens, ctx_lens, nh, nkv, d, dtype)
    t = q.shape[0]
    k, v = torch.randn(t, nkv, d, device=DEV).to(dtype), torch.randn(t, nkv, d, device=DEV).to(dtype)
    pos = torch.cat([torch.arange(c - n, c) for n, c in zip(q_lens, ctx_lens)]).to(DEV)
    tab = tables.long()
    slots = tab[torch.repeat_interleave(torch.arange(len(q_lens), device=DEV), torch.tensor(q_lens, device=DEV)),
                pos // 16] * 16 + pos % 16
    if max(q_lens) == 1:  # a padding row: writes nowhere, attends to what is there
        slots[0] = -1
        kc[tab[0, (ctx_lens[0] - 1) // 16], (ctx_lens[0] - 1) % 16] = torch.randn(nkv, d, device=DEV).to(dtype)
        vc[tab[0, (ctx_lens[0] - 1) // 16], (ctx_lens[0] - 1) % 16] = torch.randn(nkv, d, device=DEV).to(dtype)
    qw, kw = (1 + 0.2 * torch.randn(d, device=DEV)).to(dtype), (1 + 0.2 * torch.randn(d, device=DEV)).to(dtype)
    cos, sin = _cos_sin(t, rot // 2, DEV)
    norm_rope = (qw, kw, cos, sin, 1e-6) if with_norm else (None, None, cos, sin, 0.0)
    kc2, vc2 = kc.clone(), vc.clone()
    meta = (tables, ctx, qsl, d**-0.5, max(q_lens), max(ctx_lens))
    with poisoned():
        out = tri_attn.paged_attention(q, kc, vc, *meta, num_splits=splits, new_kv=(k, v, slots, *norm_rope))
    keep = slots >= 0
    rq, rk = ref_rope.qk_norm_rope(q, k, *norm_rope)
    ref_attn.write_kv_cache(rk[keep], v[keep], kc2, vc2, slots[keep])
    if CUDA or dtype == torch.float32:
        assert torch.equal(vc.nan_to_num(), vc2.nan_to_num()) and torch.equal(kc.isnan(), kc2.isnan())
        torch.testing.assert_close(kc.nan_to_num(), kc2.nan_to_num(), rtol=1e-5 if dtype == torch.float32 else 1e-2,
                                   atol=1e-5 if dtype == torch.float32 else 1e-2)
    check(out, ref_attn.paged_attention(rq, kc2, vc2, *meta), dtype, tight=2e-5, loose=1.2e-2)


# ------------------------------------------------------------------------------------ sampling, inputs
@pytest.mark.parametrize("b,v", [(1, 128008), (3, 5000), (2, 4096), (5, 17)] if BIG else [(1, 9000), (3, 5000),
                                                                                          (2, 4096), (5, 17)])
def test_argmax(b, v):
    x = torch.randn(b, v, device=DEV)
    x[0, v // 3] = x[0, v - 1] = x[0].max() + 1  # a tie: the lower index wins, as torch's
    if b > 1:
        x[1] = float("-inf")  # all -inf: index 0
    if b > 2:
        x[2, 7] = float("nan")  # NaN counts as the largest
    with poisoned():
        out = tri_sampling.argmax(x)
    assert out.dtype == torch.int64 and out.tolist() == x.argmax(-1).tolist()
    with poisoned():  # again, into a given buffer (the counters were reset by the first launch)
        buf = torch.empty(b + 2, dtype=torch.int64, device=DEV)
        tri_sampling.argmax(x[:, : v - 1], out=buf[:b])
    assert buf[:b].tolist() == x[:, : v - 1].argmax(-1).tolist()


@pytest.mark.parametrize("with_prev", [False, True])
@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64])
def test_token_inputs(with_prev, pos_dtype):
    torch.manual_seed(0)
    emb = torch.randn(1000, 96, device=DEV, dtype=torch.bfloat16)
    cos_t, sin_t = torch.randn(64, 16, device=DEV), torch.randn(64, 16, device=DEV)
    ids = torch.randint(0, 1000, (5,), device=DEV, dtype=pos_dtype)
    positions = torch.randint(0, 64, (5,), device=DEV, dtype=pos_dtype)
    prev = None
    if with_prev:
        prev = (torch.tensor([-1, 2, -1, 0, 3], device=DEV, dtype=pos_dtype),
                torch.randint(0, 1000, (4,), device=DEV, dtype=torch.int64))
    with poisoned():
        h, cos, sin = tri_embedding.token_inputs(emb, cos_t, sin_t, ids, positions, prev)
    rh, rcos, rsin = ref_embedding.token_inputs(emb, cos_t, sin_t, ids, positions, prev)
    assert torch.equal(h, rh) and torch.equal(cos, rcos) and torch.equal(sin, rsin)
    if with_prev:
        assert torch.equal(h[1], emb[prev[1][2]]) and torch.equal(h[0], emb[ids[0]])


# ------------------------------------------------------------------------------------ CUDA only
@pytest.mark.skipif(not CUDA, reason="CUDA")
def test_dispatch_picks_triton_on_cuda(monkeypatch):
    import param2moe.kernels as ops

    x = torch.randn(4, 2048, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2048, device="cuda", dtype=torch.bfloat16)
    called = []
    orig = tri_norm.rms_norm
    monkeypatch.setattr(tri_norm, "rms_norm", lambda *a: called.append(1) or orig(*a))
    ops.rms_norm(x, w, 1e-6)
    assert called
    ops.rms_norm(x.cpu(), w.cpu(), 1e-6)  # the CPU path stays plain torch
    assert len(called) == 1


@pytest.mark.skipif(not CUDA, reason="CUDA")
def test_cuda_graph_capture_moe_and_attention():
    torch.manual_seed(0)
    x, w13, w2, weights, ids = _moe_inputs(4, 64, 2048, 2048, 6, torch.bfloat16)
    x1, ids1, w1 = x[:1].clone(), ids[:1].clone(), weights[:1].clone()  # one token: the no-align layout
    q, kc, vc, tables, ctx, qsl = _paged_batch([1] * 4, [100, 1000, 5, 300], 32, 8, 64, torch.bfloat16)
    run = lambda: (tri_moe.moe_experts(x, w13, w2, weights, ids),  # noqa: E731
                   tri_attn.paged_attention(q, kc, vc, tables, ctx, qsl, 0.125, 1, 1024),
                   tri_moe.moe_experts(x1, w13, w2, w1, ids1))
    run()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = run()
    # new inputs in the same buffers, then replay
    x.copy_(torch.randn_like(x))
    ids.copy_(torch.rand(4, 64, device="cuda").topk(6, dim=-1).indices)
    x1.copy_(torch.randn_like(x1))
    ids1.copy_(torch.rand(1, 64, device="cuda").topk(6, dim=-1).indices)
    q.copy_(torch.randn_like(q))
    ctx.copy_(torch.tensor([64, 999, 5, 1], device="cuda", dtype=torch.int32))  # within the written tokens
    g.replay()
    torch.cuda.synchronize()
    check(outs[0], ref_moe.moe_experts(x, w13, w2, weights, ids), torch.bfloat16)
    check(outs[2], ref_moe.moe_experts(x1, w13, w2, w1, ids1), torch.bfloat16)
    check(outs[1], ref_attn.paged_attention(q, kc, vc, tables, ctx, qsl, 0.125, 1, 1024), torch.bfloat16,
          loose=1.2e-2)
