"""The CPU fast paths of the plain torch ops against naive loops: oneDNN linear with packed weights,
paged attention over batches that mix decodes with prompt chunks (the CPU splits them into two calls),
and the per-step reuse of the attention layout."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from param2moe.kernels import attention as attn_mod
from param2moe.kernels import matmul
from param2moe.kernels.attention import paged_attention


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_linear_matches_f_linear(dtype, rows):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 80, generator=g).to(dtype)
    stack = torch.randn(3, 48, 80, generator=g).to(dtype)
    bias = torch.randn(96, generator=g).to(dtype)
    x = torch.randn(rows, 80, generator=g).to(dtype)
    tol = dict(atol=1e-4, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.1, rtol=0.02)
    torch.testing.assert_close(matmul.linear(x, w, bias), F.linear(x, w, bias), **tol)
    for e in range(3):
        torch.testing.assert_close(matmul.linear(x, stack, index=e), F.linear(x, stack[e]), **tol)
    if matmul.onednn_enabled():
        assert matmul.packed_weight(w) is not None and len(stack._p2m_onednn) == 3


def test_linear_without_onednn_is_f_linear():
    w, x = torch.randn(16, 8), torch.randn(3, 8)
    matmul.set_onednn(False)
    try:
        assert matmul.packed_weight(w) is None
        assert torch.equal(matmul.linear(x, w), F.linear(x, w))
    finally:
        matmul.set_onednn(None)


def naive_paged_attention(q, k_cache, v_cache, tables, ctx_lens, q_lens, scale):
    """One query at a time, one key at a time (float64)."""
    bs, nkv = k_cache.shape[1], k_cache.shape[2]
    g = q.shape[1] // nkv
    out, t = torch.zeros(q.shape, dtype=torch.float64), 0
    for b, (n_ctx, n_q) in enumerate(zip(ctx_lens, q_lens)):
        for i in range(n_q):
            pos = n_ctx - n_q + i
            for h in range(q.shape[1]):
                keys = [k_cache[tables[b][j // bs], j % bs, h // g].double() for j in range(pos + 1)]
                vals = [v_cache[tables[b][j // bs], j % bs, h // g].double() for j in range(pos + 1)]
                scores = torch.stack([q[t, h].double() @ key for key in keys]) * scale
                out[t, h] = (scores.softmax(0)[:, None] * torch.stack(vals)).sum(0)
            t += 1
    return out


@pytest.mark.parametrize("q_lens", [[1, 1, 1], [1, 7, 1, 4], [5, 3], [1, 9]])
def test_paged_attention_mixed_batches(q_lens):
    g = torch.Generator().manual_seed(sum(q_lens))
    bs, nkv, nh, d, num_blocks = 4, 2, 6, 8, 24
    ctx_lens = [n + extra for n, extra in zip(q_lens, [6, 0, 13, 2])]
    # Unwritten slots are NaN (a cache from torch.empty): they must not leak into any output.
    k_cache = torch.full((num_blocks, bs, nkv, d), float("nan"))
    v_cache = torch.full((num_blocks, bs, nkv, d), float("nan"))
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, width = [], max(-(-c // bs) for c in ctx_lens)
    for c in ctx_lens:
        blocks = [perm.pop() for _ in range(-(-c // bs))]
        for j in range(c):
            k_cache[blocks[j // bs], j % bs] = torch.randn(nkv, d, generator=g)
            v_cache[blocks[j // bs], j % bs] = torch.randn(nkv, d, generator=g)
        tables.append(blocks + [0] * (width - len(blocks)))
    q = torch.randn(sum(q_lens), nh, d, generator=g)
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()])
    args = (q, k_cache, v_cache, torch.tensor(tables, dtype=torch.int32), torch.tensor(ctx_lens, dtype=torch.int32),
            qsl, d**-0.5, max(q_lens), max(ctx_lens))
    out = paged_attention(*args)
    want = naive_paged_attention(q, k_cache, v_cache, tables, ctx_lens, q_lens, d**-0.5)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    # A second layer with the same metadata reuses the layout and gives the same result.
    assert attn_mod._last_layout[0] is not None
    groups = attn_mod._last_layout[0][1]
    assert len(groups) == (2 if 1 in q_lens and max(q_lens) > 1 else 1)
    assert torch.equal(paged_attention(*args), out)
    assert attn_mod._last_layout[0][1] is groups


def test_paged_attention_new_metadata_new_layout():
    bs, nkv, d = 4, 1, 8
    k_cache, v_cache = torch.randn(4, bs, nkv, d), torch.randn(4, bs, nkv, d)
    q = torch.randn(2, 2, d)
    common = (k_cache, v_cache)
    a = paged_attention(q, *common, torch.tensor([[0, 1]]), torch.tensor([6]), torch.tensor([0, 2]), 0.3, 2, 6)
    b = paged_attention(q, *common, torch.tensor([[2, 3]]), torch.tensor([6]), torch.tensor([0, 2]), 0.3, 2, 6)
    assert not torch.allclose(a, b)  # other blocks: not the previous layout
    assert math.isfinite(float(a.sum())) and math.isfinite(float(b.sum()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 9, 64, 700])
def test_moe_experts_cpu_matches_the_oracle(dtype, tokens):
    """The CPU arrangement (rows padded to bucketed counts for oneDNN) gives the oracle's result exactly,
    with some pairs routed nowhere (-1)."""
    from param2moe.kernels import moe

    g = torch.Generator().manual_seed(tokens)
    e, h, i, k = 6, 32, 16, 3
    w13 = (torch.randn(e, 2 * i, h, generator=g) * 0.2).to(dtype)
    w2 = (torch.randn(e, h, i, generator=g) * 0.2).to(dtype)
    x = torch.randn(tokens, h, generator=g).to(dtype)
    ids = torch.randn(tokens, e, generator=g).topk(k).indices
    ids[0, -1] = -1
    weights = torch.rand(tokens, k, generator=g)
    assert moe._bucket(64) == 64 and moe._bucket(65) == 96 and moe._bucket(257) == 320
    torch.testing.assert_close(moe.moe_experts_cpu(x, w13, w2, weights, ids), moe.moe_experts(x, w13, w2, weights, ids),
                               atol=0, rtol=0)
    assert not moe.moe_experts_cpu(x, w13, w2, weights, torch.full_like(ids, -1)).any()
