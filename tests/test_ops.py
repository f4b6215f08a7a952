"""The plain torch ops against naive per-token / per-expert loops written here from docs/model.md, and the
network's paged (KV-cached) forward against full recomputation."""

from __future__ import annotations

import math

import pytest
import torch
from cases import ROUTE_CASES

from param2moe.checkpoint import load_model
from param2moe.kernels import (
    add_rms_norm,
    causal_attention,
    moe_experts,
    paged_attention,
    rms_norm,
    route,
)
from param2moe.kernels.attention import write_kv_cache
from param2moe.model.attention import CausalAttention, PagedAttention
from param2moe.writer import preset_config, write_checkpoint


# ------------------------------------------------------------------------------------ routing
def naive_route(logits, bias, k, score_function="sigmoid", n_group=None, topk_group=None, norm=True, scale=1.0):
    """docs/model.md §3.4 for one token at a time, in Python lists: (ids, weights) per token, as dicts id -> weight."""
    out = []
    for row in logits.double().tolist():
        e = len(row)
        if score_function == "sigmoid":
            s = [1 / (1 + math.exp(-v)) for v in row]
        else:
            m = max(row)
            z = sum(math.exp(v - m) for v in row)
            s = [math.exp(v - m) / z for v in row]
        c = [s[i] + (bias[i] if bias is not None else 0.0) for i in range(e)]
        if n_group is not None:
            size = e // n_group
            group_score = []
            for g in range(n_group):
                best = sorted(c[g * size:(g + 1) * size], reverse=True)
                group_score.append(sum(best[:2]))  # top-2 sum (top-1 for a one-expert group)
            kept = sorted(range(n_group), key=lambda g: -group_score[g])[:topk_group]
            c = [c[i] if i // size in kept else -math.inf for i in range(e)]
        ids = sorted(range(e), key=lambda i: -c[i])[:k]
        w = [s[i] for i in ids]
        if norm:
            total = sum(w)
            w = [x / total for x in w]
        out.append({i: x * scale for i, x in zip(ids, w)})
    return out


def as_dicts(weights, ids):
    return [dict(zip(i, w)) for i, w in zip(ids.tolist(), weights.double().tolist())]


def assert_same_routing(got, want):
    assert len(got) == len(want)
    for t, (g, w) in enumerate(zip(got, want)):
        assert set(g) == set(w), f"token {t}: experts {sorted(g)} != {sorted(w)}"
        for i in w:
            assert g[i] == pytest.approx(w[i], rel=1e-5, abs=1e-6), f"token {t} expert {i}"


@pytest.mark.parametrize("name", list(ROUTE_CASES))
@pytest.mark.parametrize("with_bias", [True, False])
def test_route_matches_the_per_token_loop(name, with_bias):
    kw = ROUTE_CASES[name]
    gen = torch.Generator().manual_seed(hash(name) % 1000)
    logits = torch.randn(37, 16, generator=gen) * 2
    bias = torch.randn(16, generator=gen) * 0.3 if with_bias else None
    weights, ids = route(logits, bias, 4, **kw)
    assert weights.dtype == torch.float32 and weights.shape == ids.shape == (37, 4)
    want = naive_route(logits, bias.tolist() if bias is not None else None, 4,
                       kw.get("score_function", "sigmoid"), kw.get("n_group"), kw.get("topk_group"),
                       kw.get("norm_topk_prob", True), kw.get("routed_scaling_factor", 1.0))
    assert_same_routing(as_dicts(weights, ids), want)


def test_bias_chooses_but_does_not_weight():
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 5.0])
    weights, ids = route(logits, bias, 2, norm_topk_prob=False)
    got = as_dicts(weights, ids)[0]
    sig = [1 / (1 + math.exp(-v)) for v in (2.0, 0.0, 1.0, -1.0)]
    assert set(got) == {0, 3}  # expert 3 only wins through its bias
    assert got[3] == pytest.approx(sig[3]) and got[0] == pytest.approx(sig[0])
    weights, ids = route(logits, bias, 2, norm_topk_prob=True, routed_scaling_factor=2.5)
    got = as_dicts(weights, ids)[0]
    assert got[3] == pytest.approx(2.5 * sig[3] / (sig[0] + sig[3]))
    assert got[0] == pytest.approx(2.5 * sig[0] / (sig[0] + sig[3]))


def _logit(p):
    return math.log(p / (1 - p))


def test_group_score_is_the_top2_sum_not_the_max():
    # Group A holds the single best expert (0.9) but group B the better pair (0.6 + 0.6 > 0.9 + 0.1).
    probs = [0.9, 0.1, 0.1, 0.1, 0.6, 0.6, 0.1, 0.1]
    logits = torch.tensor([[_logit(p) for p in probs]])
    weights, ids = route(logits, torch.zeros(8), 2, n_group=2, topk_group=1)
    assert sorted(ids[0].tolist()) == [4, 5]
    torch.testing.assert_close(weights[0], torch.tensor([0.5, 0.5]))


def test_masked_groups_get_minus_infinity_not_zero():
    # A negative bias makes every choice score negative: masking with 0 would pick the dropped group.
    probs = [0.9, 0.8, 0.1, 0.2]
    logits = torch.tensor([[_logit(p) for p in probs]])
    weights, ids = route(logits, torch.full((4,), -2.0), 2, n_group=2, topk_group=1)
    assert sorted(ids[0].tolist()) == [0, 1]
    got = as_dicts(weights, ids)[0]
    assert got[0] == pytest.approx(0.9 / 1.7) and got[1] == pytest.approx(0.8 / 1.7)


def test_softmax_is_over_all_experts_before_choosing():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    weights, ids = route(logits, None, 2, score_function="softmax", norm_topk_prob=False)
    p = torch.softmax(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64), 0)
    got = as_dicts(weights, ids)[0]
    assert set(got) == {2, 3}
    assert got[3] == pytest.approx(float(p[3])) and got[2] == pytest.approx(float(p[2]))


def test_routing_is_fp32_even_for_bf16_logits():
    gen = torch.Generator().manual_seed(5)
    logits32 = torch.randn(64, 16, generator=gen) * 0.01  # tiny logits, as random routers have
    bias = torch.randn(16, generator=gen) * 0.001
    weights, ids = route(logits32, bias, 4, routed_scaling_factor=2.5)
    assert weights.dtype == torch.float32
    assert_same_routing(as_dicts(weights, ids), naive_route(logits32, bias.tolist(), 4, scale=2.5))


# ------------------------------------------------------------------------------------ experts
def naive_moe(x, w13, w2, weights, ids):
    inter = w2.shape[2]
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if e < 0:
                continue
            xt = x[t].double()
            gate = w13[e, :inter].double() @ xt
            up = w13[e, inter:].double() @ xt
            h = w2[e].double() @ (torch.nn.functional.silu(gate) * up)
            out[t] += float(weights[t, k]) * h
    return out


def _moe_inputs(seed, t=11, h=24, inter=16, e=6, k=3, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=gen).to(dtype)
    w13 = (torch.randn(e, 2 * inter, h, generator=gen) * 0.3).to(dtype)
    w2 = (torch.randn(e, h, inter, generator=gen) * 0.3).to(dtype)
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)])
    weights = torch.rand(t, k, generator=gen)
    return x, w13, w2, weights, ids


def test_moe_experts_matches_the_loop():
    x, w13, w2, weights, ids = _moe_inputs(0)
    out = moe_experts(x, w13, w2, weights, ids)
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out.double(), naive_moe(x, w13, w2, weights, ids), atol=1e-5, rtol=1e-5)


def test_moe_experts_ids_minus_one_contribute_nothing():
    x, w13, w2, weights, ids = _moe_inputs(1)
    ids[0, :] = -1  # a token with no local expert at all
    ids[3, 1] = -1
    ids[5, 0] = -1
    ids[7, 2] = -1
    weights[ids < 0] = 123.0  # a -1 entry's weight must not leak in
    out = moe_experts(x, w13, w2, weights, ids)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    torch.testing.assert_close(out.double(), naive_moe(x, w13, w2, weights, ids), atol=1e-5, rtol=1e-5)


def test_moe_experts_unused_experts_and_one_token():
    x, w13, w2, weights, ids = _moe_inputs(2, t=1, e=8, k=2)
    out = moe_experts(x, w13, w2, weights, ids)
    torch.testing.assert_close(out.double(), naive_moe(x, w13, w2, weights, ids), atol=1e-5, rtol=1e-5)


def test_moe_experts_bf16():
    x, w13, w2, weights, ids = _moe_inputs(3, dtype=torch.bfloat16)
    out = moe_experts(x, w13, w2, weights, ids)
    assert out.dtype == torch.bfloat16
    ref = naive_moe(x, w13, w2, weights, ids)
    torch.testing.assert_close(out.double(), ref, atol=5e-2, rtol=3e-2)


# ------------------------------------------------------------------------------------ rms norm
def test_rms_norm_matches_the_formula():
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 64, generator=gen), torch.rand(64, generator=gen) + 0.5
    want = torch.stack([w.double() * r.double() / math.sqrt(float((r.double() ** 2).mean()) + 1e-6) for r in x])
    torch.testing.assert_close(rms_norm(x, w, 1e-6).double(), want, atol=1e-6, rtol=1e-6)


def test_rms_norm_computes_in_fp32_for_half_inputs():
    # x^2 overflows fp16 (max 65504) at |x| = 300: only an fp32 computation gets this right.
    gen = torch.Generator().manual_seed(1)
    x32 = 300 + 50 * torch.randn(4, 128, generator=gen)
    w = torch.rand(128, generator=gen) + 0.5
    want = (w.double() * x32.half().double() / torch.sqrt((x32.half().double() ** 2).mean(-1, keepdim=True) + 1e-6))
    got = rms_norm(x32.half(), w.half(), 1e-6)
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want.half().double(), atol=2e-3, rtol=2e-3)
    got = rms_norm(x32.bfloat16(), w.bfloat16(), 1e-6)
    assert got.dtype == torch.bfloat16


def test_add_rms_norm_returns_the_sum_as_residual():
    gen = torch.Generator().manual_seed(2)
    x, res, w = torch.randn(3, 32, generator=gen), torch.randn(3, 32, generator=gen), torch.rand(32, generator=gen)
    normed, new_res = add_rms_norm(x, res, w, 1e-5)
    s = (x + res).double()
    torch.testing.assert_close(new_res.double(), s)
    torch.testing.assert_close(normed.double(), w.double() * s / torch.sqrt((s * s).mean(-1, keepdim=True) + 1e-5),
                               atol=1e-6, rtol=1e-6)


def test_unsummed_expert_outputs_summed_by_the_next_norm():
    """A MoE layer's output may reach the next norm unsummed (ops.ExpertOutputs, CUDA's fused path): the
    norm's sum skips pairs whose id is -1 (their rows may hold anything, NaN included)."""
    from param2moe.kernels import ExpertOutputs, sum_experts

    gen = torch.Generator().manual_seed(5)
    t, k, h = 4, 3, 16
    pair_out = torch.randn(t * k, h, generator=gen)
    ids = torch.tensor([[0, 5, -1], [2, -1, -1], [1, 3, 4], [-1, -1, -1]])
    pair_out[(ids.reshape(-1) < 0)] = float("nan")
    weights = torch.rand(t, k, generator=gen)
    res, w = torch.randn(t, h, generator=gen), torch.rand(h, generator=gen)
    want = torch.zeros(t, h, dtype=torch.float64)
    for i in range(t):
        for j in range(k):
            if ids[i, j] >= 0:
                want[i] += weights[i, j].double() * pair_out[i * k + j].double()
    eo = ExpertOutputs(pair_out, weights, ids)
    torch.testing.assert_close(sum_experts(eo).double(), want)
    normed, new_res = add_rms_norm(eo, res, w, 1e-6)
    s = want + res.double()
    torch.testing.assert_close(new_res.double(), s)
    torch.testing.assert_close(normed.double(), w.double() * s / torch.sqrt((s * s).mean(-1, keepdim=True) + 1e-6),
                               atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------ attention
def naive_attention(q, k, v, q_positions, scale):
    """q [Tq, NH, D] at absolute q_positions over k/v [Tk, NKV, D] of one sequence (positions 0..Tk-1):
    softmax over keys at positions <= the query's; query head h reads KV head h // (NH/NKV)."""
    nh, nkv = q.shape[1], k.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for i, pos in enumerate(q_positions):
        for h in range(nh):
            kv = h // (nh // nkv)
            s = (k[:pos + 1, kv].double() @ q[i, h].double()) * scale
            out[i, h] = torch.softmax(s, 0) @ v[:pos + 1, kv].double()
    return out


def test_causal_attention_matches_the_loop():
    gen = torch.Generator().manual_seed(0)
    lens = [5, 1, 9]
    t = sum(lens)
    q = torch.randn(t, 4, 8, generator=gen)
    k, v = torch.randn(t, 2, 8, generator=gen), torch.randn(t, 2, 8, generator=gen)
    cu = [0, 5, 6, 15]
    out = causal_attention(q, k, v, cu, 8**-0.5)
    for s, e in zip(cu[:-1], cu[1:]):
        want = naive_attention(q[s:e], k[s:e], v[s:e], list(range(e - s)), 8**-0.5)
        torch.testing.assert_close(out[s:e].double(), want, atol=1e-5, rtol=1e-5)


def test_write_kv_cache_writes_each_row_at_its_slot():
    k_cache, v_cache = torch.zeros(3, 4, 2, 8), torch.zeros(3, 4, 2, 8)
    k, v = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    write_kv_cache(k, v, k_cache, v_cache, torch.tensor([9, 2, 4]))  # slot = block * 4 + offset
    assert torch.equal(k_cache[2, 1], k[0]) and torch.equal(v_cache[2, 1], v[0])
    assert torch.equal(k_cache[0, 2], k[1]) and torch.equal(v_cache[0, 2], v[1])
    assert torch.equal(k_cache[1, 0], k[2]) and torch.equal(v_cache[1, 0], v[2])
    assert int((k_cache != 0).any(-1).any(-1).sum()) == 3  # nothing else touched


def test_paged_attention_matches_causal_attention_on_the_contiguous_sequences():
    """A mixed batch over a paged cache with random block tables: a prefill chunk over a cached
    prefix, two decodes, and a fresh prefill; compared with attention over each whole sequence."""
    gen = torch.Generator().manual_seed(7)
    nh, nkv, d, bs, num_blocks = 4, 2, 16, 4, 40
    # (tokens already cached, new tokens this step) per sequence
    seqs = [(10, 7), (13, 1), (4, 1), (0, 6), (3, 1)]
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    max_blocks = max(-(-(c + n) // bs) for c, n in seqs) + 1
    k_cache = torch.randn(num_blocks, bs, nkv, d, generator=gen)  # garbage everywhere unused
    v_cache = torch.randn(num_blocks, bs, nkv, d, generator=gen)
    tables, qs, want = [], [], []
    for c, n in seqs:
        nblk = -(-(c + n) // bs)
        blocks = [perm.pop() for _ in range(nblk)]
        tables.append(blocks + [-1] * (max_blocks - nblk))
        kk, vv = torch.randn(c + n, nkv, d, generator=gen), torch.randn(c + n, nkv, d, generator=gen)
        for j in range(c + n):  # the sequence's token j lives at block j // bs, offset j % bs
            k_cache[blocks[j // bs], j % bs] = kk[j]
            v_cache[blocks[j // bs], j % bs] = vv[j]
        q = torch.randn(n, nh, d, generator=gen)
        qs.append(q)
        want.append(naive_attention(q, kk, vv, list(range(c, c + n)), d**-0.5))
    q_lens = [n for _, n in seqs]
    qsl = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0).tolist()))
    ctx = [c + n for c, n in seqs]
    out = paged_attention(torch.cat(qs), k_cache, v_cache, torch.tensor(tables), torch.tensor(ctx), qsl, d**-0.5,
                          max(q_lens), max(ctx))
    assert out.shape == (sum(q_lens), nh, d)
    torch.testing.assert_close(out.double(), torch.cat(want), atol=1e-5, rtol=1e-5)


def test_paged_attention_equals_causal_attention_for_whole_prefills():
    gen = torch.Generator().manual_seed(8)
    nh, nkv, d, bs = 4, 1, 8, 2
    lens = [5, 3]
    t = sum(lens)
    q = torch.randn(t, nh, d, generator=gen)
    k, v = torch.randn(t, nkv, d, generator=gen), torch.randn(t, nkv, d, generator=gen)
    k_cache, v_cache = torch.zeros(8, bs, nkv, d), torch.zeros(8, bs, nkv, d)
    tables = torch.tensor([[6, 1, 4], [2, 7, -1]])
    slots = torch.tensor([6 * 2, 6 * 2 + 1, 1 * 2, 1 * 2 + 1, 4 * 2, 2 * 2, 2 * 2 + 1, 7 * 2])
    write_kv_cache(k, v, k_cache, v_cache, slots)
    out = paged_attention(q, k_cache, v_cache, tables, torch.tensor(lens), torch.tensor([0, 5, 8]), d**-0.5, 5, 5)
    torch.testing.assert_close(out, causal_attention(q, k, v, [0, 5, 8], d**-0.5), atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------ the network, cached
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    write_checkpoint(str(out), preset_config("tiny"), seed=11)
    return load_model(str(out), dtype=torch.float32, progress=False)


def test_paged_forward_equals_full_recomputation(tiny_model):
    """Two sequences through the paged cache: A's prompt in two chunks then three decodes, B's
    prompt in one step then four decodes, batched together; every new token's logits equal those of
    one CausalAttention forward over both whole sequences."""
    model = tiny_model
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    seq_a = torch.randint(0, cfg.vocab_size, (16,), generator=gen)
    seq_b = torch.randint(0, cfg.vocab_size, (10,), generator=gen)
    with torch.no_grad():
        hidden = model(torch.cat([seq_a, seq_b]), torch.cat([torch.arange(16), torch.arange(10)]),
                       CausalAttention([16, 10]))
        full = model.compute_logits(hidden)
    ref = {"a": (hidden[:16], full[:16]), "b": (hidden[16:], full[16:])}

    bs, num_blocks = 4, 16
    tables = {"a": [13, 2, 7, 9], "b": [5, 0, 11]}  # arbitrary, out of order
    n_layers, nkv, d = cfg.num_hidden_layers, cfg.num_kv_heads, cfg.head_size
    k_caches = [torch.full((num_blocks, bs, nkv, d), float("nan")) for _ in range(n_layers)]
    v_caches = [torch.full((num_blocks, bs, nkv, d), float("nan")) for _ in range(n_layers)]
    for kc, vc in zip(k_caches, v_caches):  # the blocks in use start as zeros; the rest stay NaN
        for blocks in tables.values():
            kc[blocks] = 0
            vc[blocks] = 0
    # steps: per sequence (start, end) of the new tokens
    steps = [{"a": (0, 8), "b": (0, 6)}, {"a": (8, 13), "b": (6, 7)}, {"a": (13, 14), "b": (7, 8)},
             {"a": (14, 15), "b": (8, 9)}, {"a": (15, 16), "b": (9, 10)}]
    seqs = {"a": seq_a, "b": seq_b}
    width = max(len(t) for t in tables.values())
    table = torch.tensor([tables[s] + [0] * (width - len(tables[s])) for s in ("a", "b")])
    for step in steps:
        ids, pos, slots, ctx, qsl = [], [], [], [], [0]
        for s in ("a", "b"):
            start, end = step[s]
            ids.append(seqs[s][start:end])
            pos.append(torch.arange(start, end))
            slots += [tables[s][j // bs] * bs + j % bs for j in range(start, end)]
            ctx.append(end)
            qsl.append(qsl[-1] + end - start)
        q_lens = [end - start for start, end in step.values()]
        attn = PagedAttention(k_caches, v_caches, torch.tensor(slots), table, torch.tensor(ctx), torch.tensor(qsl),
                              max_query_len=max(q_lens), max_context_len=max(ctx))
        with torch.no_grad():
            h = model(torch.cat(ids), torch.cat(pos), attn)
            logits = model.compute_logits(h)
        for i, s in enumerate(("a", "b")):
            start, end = step[s]
            ref_h, ref_logits = ref[s][0][start:end], ref[s][1][start:end]
            # The final hidden state (|h| < 4) to 1e-5; the logits reach +-22 (head_std 0.5), where
            # fp32 rounding through three layers alone is ~1e-5, so they get a relative margin too.
            torch.testing.assert_close(h[qsl[i]:qsl[i + 1]], ref_h, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(logits[qsl[i]:qsl[i + 1]], ref_logits, atol=1e-5, rtol=1e-4)
    # the logits are not all alike (the comparison above means something)
    assert (full[1:] - full[:-1]).abs().max() > 1.0


def test_paged_attention_ignores_garbage_past_the_context():
    """Unwritten slots (NaN here, as in a cache from torch.empty) past a context contribute nothing."""
    gen = torch.Generator().manual_seed(9)
    nh, nkv, d, bs = 2, 1, 8, 4
    k_cache = torch.full((3, bs, nkv, d), float("nan"))
    v_cache = torch.full((3, bs, nkv, d), float("nan"))
    k, v = torch.randn(7, nkv, d, generator=gen), torch.randn(7, nkv, d, generator=gen)
    # sequence 0: 2 tokens in block 2 (slots 2..3 unwritten); sequence 1: 5 tokens in blocks 0, 1
    write_kv_cache(k, v, k_cache, v_cache, torch.tensor([8, 9, 0, 1, 2, 3, 4]))
    q = torch.randn(2, nh, d, generator=gen)
    out = paged_attention(q, k_cache, v_cache, torch.tensor([[2, 2], [0, 1]]), torch.tensor([2, 5]),
                          torch.tensor([0, 1, 2]), d**-0.5, 1, 5)
    want0 = naive_attention(q[:1], k[:2], v[:2], [1], d**-0.5)
    want1 = naive_attention(q[1:], k[2:], v[2:], [4], d**-0.5)
    torch.testing.assert_close(out.double(), torch.cat([want0, want1]), atol=1e-5, rtol=1e-5)


def test_folded_shared_experts_give_the_same_network(tmp_path):
    """The shared expert appended to the stacked experts (the fused-MoE layout on GPUs) computes the
    same function: fp32, Param2 layout with 2 shared experts of twice an expert's width."""
    cfg = preset_config("tiny", {"num_hidden_layers": 3, "moe_shared_expert_intermediate_size": 128})
    write_checkpoint(str(tmp_path), cfg, seed=2)
    model = load_model(str(tmp_path), torch.float32, torch.device("cpu"))
    ids = torch.randint(30, cfg.vocab_size, (40,))
    positions = torch.cat([torch.arange(25), torch.arange(15)])
    with torch.no_grad():
        want = model.compute_logits(model(ids, positions, CausalAttention([25, 15])))
        assert model.fold_shared_experts() == 2
        moe = model.model.layers["1"].mlp
        assert moe.shared_experts is None and moe.num_folded_shared == 2 and moe.w13.shape[0] == cfg.num_experts + 2
        got = model.compute_logits(model(ids, positions, CausalAttention([25, 15])))
    assert (got - want).abs().max() < 1e-4


def test_uniform_random_routing_replaces_the_choice_after_the_router_runs(tiny_model, monkeypatch):
    """Benchmarks' routing (docs/model.md §7): every MoE layer's router still runs, then random expert sets drawn
    for all layers of the step replace its choice; off again gives the router's outputs back."""
    from param2moe.model import network

    calls = []
    kernels = tiny_model.model.layers["1"].mlp.ops  # the model's backend
    real_route = kernels.add_rms_norm_gate_route
    monkeypatch.setattr(kernels, "add_rms_norm_gate_route", lambda *a, **k: calls.append(1) or real_route(*a, **k))
    ids, pos = torch.arange(40, 70), torch.arange(30)
    with torch.no_grad():
        ref = tiny_model(ids, pos, CausalAttention([30]))
        n_moe = len(calls)
        tiny_model.set_uniform_random_routing(True, table_rows=64)
        out = tiny_model(ids, pos, CausalAttention([30]))
        moes = [m for m in tiny_model.modules() if isinstance(m, network.MoE)]
        picks = [m.random_choice[1] for m in moes]
        tiny_model.set_uniform_random_routing(False)
        again = tiny_model(ids, pos, CausalAttention([30]))
    assert n_moe == len(moes) and len(calls) == 3 * n_moe  # the router ran in every pass
    k = tiny_model.config.num_experts_per_tok
    for p in picks:
        assert p.shape == (30, k) and 0 <= int(p.min()) and int(p.max()) < tiny_model.config.num_experts
        assert (p.sort(-1).values.diff(dim=-1) > 0).all()  # distinct experts a token
    assert not torch.allclose(out, ref)
    torch.testing.assert_close(again, ref, rtol=0, atol=0)
