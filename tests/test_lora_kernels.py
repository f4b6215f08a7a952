"""Batched LoRA kernels: the Triton version (kernels/triton/lora.py) against the plain torch oracle
(kernels/lora.py), and the oracle itself against a per-row loop written here.

Runs on CUDA when a GPU is there, else on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1);
the Triton tests are skipped when triton is not installed.
"""

from __future__ import annotations

import os

import pytest
import torch

from param2moe.kernels import lora as ref

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
DEV = "cuda" if CUDA else "cpu"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _tri():
    pytest.importorskip("triton")
    from param2moe.kernels.triton import lora as tri

    return tri


def close(got, want, dtype, loose=1e-2):
    """fp32: elementwise; bf16: within rounding, as a relative error of the whole (Triton's interpreter rounds
    fp32 -> bf16 toward zero, torch to nearest: a bias that adds up over stages)."""
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        err = ((got.double() - want.double()).norm() / want.double().norm()).item()
        assert err < (loose if CUDA else 4 * loose), f"relative error {err:.3g}"


def _case(m, k, n, slices, rank, buckets, dtype, seed=0, none_share=0.3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(DEV, dtype)
    a = (torch.randn(buckets, slices, rank, k, generator=g) / k**0.5).to(DEV, dtype)
    b = torch.randn(buckets, slices, n, rank, generator=g).to(DEV, dtype)
    y = torch.randn(m, slices * n, generator=g).to(DEV, dtype)
    index = torch.randint(0, buckets, (m,), generator=g)
    index[torch.rand(m, generator=g) < none_share] = -1
    return y, x, a, b, index.to(DEV, torch.int32)


@pytest.mark.parametrize("way", ["gathered", "grouped"])
def test_oracle_against_a_row_loop(way, monkeypatch):
    if way == "grouped":  # the per-adapter matmuls of large batches
        monkeypatch.setattr(ref, "_GATHER_BYTES", 0)
    y, x, a, b, index = _case(23, 48, 40, 2, 8, 3, torch.float32)
    want = y.clone()
    for m in range(23):
        i = int(index[m])
        if i >= 0:
            want[m] += torch.cat([b[i, j] @ (a[i, j] @ x[m]) for j in range(2)])
    got = ref.add_lora(y.clone(), x, a, b, ref.rows_by_bucket(index))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    untouched = index < 0
    assert torch.equal(got[untouched], y[untouched])


@pytest.mark.parametrize("m,buckets", [(1, 4), (37, 4), (64, 16), (300, 5), (200, 1000)])
def test_rows_tile_every_adapter_row_once(m, buckets):
    tri = _tri()
    index = torch.randint(-1, buckets, (m,), dtype=torch.int32, device=DEV)
    rows = tri.lora_rows(index, buckets)
    key, order, starts = rows.key.cpu(), rows.order.cpu().long(), rows.tile_start.cpu().tolist()
    assert torch.equal(index.cpu()[order], torch.where(key < buckets, key, -1))
    seen = []
    for s in starts:
        if s >= m:
            continue
        assert int(key[s]) < buckets
        seen += [int(order[p]) for p in range(s, min(s + rows.block_m, m)) if key[p] == key[s]]
    assert sorted(seen) == (index.cpu() >= 0).nonzero().flatten().tolist()
    assert len(seen) == len(set(seen))  # no row in two tiles


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,k,n,slices,rank,buckets", [
    (1, 128, 96, 1, 16, 4),  # one decode token
    (29, 96, 40, 2, 8, 3),  # odd widths, gate/up slices, rank below the tile
    (64, 256, 64, 1, 12, 16),  # decode batch of 16 adapters, a rank that is not a power of two
    (150, 64, 130, 2, 64, 2),  # prefill-sized tiles, the largest rank
])
def test_add_lora_matches_oracle(dtype, m, k, n, slices, rank, buckets):
    tri = _tri()
    y, x, a, b, index = _case(m, k, n, slices, rank, buckets, dtype, seed=m)
    want = ref.add_lora(y.clone(), x, a, b, ref.rows_by_bucket(index))
    got = tri.add_lora(y.clone(), x, a, b, tri.lora_rows(index, buckets))
    close(got, want, dtype)
    assert torch.equal(got[index < 0], y[index < 0])  # rows without an adapter untouched


def test_add_lora_all_rows_without_adapter():
    tri = _tri()
    y, x, a, b, _ = _case(16, 64, 32, 1, 8, 2, torch.float32)
    index = torch.full((16,), -1, dtype=torch.int32, device=DEV)
    assert torch.equal(tri.add_lora(y.clone(), x, a, b, tri.lora_rows(index, 2)), y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [1, 9])
def test_moe_experts_lora_matches_oracle(dtype, t):
    tri = _tri()
    g = torch.Generator().manual_seed(t)
    e, h, inter, k, slots, rank = 8, 64, 32, 2, 3, 8
    x = torch.randn(t, h, generator=g).to(DEV, dtype)
    w13 = (torch.randn(e, 2 * inter, h, generator=g) / h**0.5).to(DEV, dtype)
    w2 = (torch.randn(e, h, inter, generator=g) / inter**0.5).to(DEV, dtype)
    weights = torch.rand(t, k, generator=g).to(DEV)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).to(DEV)
    lora = ref.ExpertLoRA(
        (torch.randn(slots * e, 2, rank, h, generator=g) / h**0.5).to(DEV, dtype),
        (torch.randn(slots * e, 2, inter, rank, generator=g) * 0.3).to(DEV, dtype),
        (torch.randn(slots * e, 1, rank, inter, generator=g) / inter**0.5).to(DEV, dtype),
        (torch.randn(slots * e, 1, h, rank, generator=g) * 0.3).to(DEV, dtype),
        torch.randint(-1, slots, (t,), generator=g, dtype=torch.int32).to(DEV))
    want = ref.moe_experts_lora(x, w13, w2, weights, ids, lora)
    got = tri.moe_experts_lora(x, w13, w2, weights, ids, lora)
    close(got, want, dtype)
    from param2moe.kernels import moe as ref_moe

    base = ref_moe.moe_experts(x, w13, w2, weights, ids)
    assert ((want - base).double().norm() / base.double().norm()) > 0.1  # the adapters change the result


@pytest.mark.slow  # ~20 s under the interpreter
def test_engine_with_the_triton_lora_kernels(tmp_path):
    """The network's LoRA hooks on the Triton kernels (CPU tensors, the interpreter; the rest of the network
    plain torch): a batch mixing adapters of every kind and the base model gives what the torch kernels give."""
    tri = _tri()
    from param2moe import LLM, LoRARequest, SamplingParams
    from param2moe.kernels import Kernels
    from param2moe.lora.files import KINDS, random_adapter
    from param2moe.writer import preset_config, write_checkpoint

    calls = {"rows": 0, "moe": 0}

    class TritonLoRA(Kernels):
        def lora_rows(self, index, num_buckets):
            calls["rows"] += 1
            return tri.lora_rows(index, num_buckets)

        def add_lora(self, y, x, a, b, rows):
            return tri.add_lora(y, x, a, b, rows)

        def moe_experts(self, x, w13, w2, weights, ids, unsummed=False, started=None, lora=None, num_appended=0):
            if lora is None:
                return super().moe_experts(x, w13, w2, weights, ids, unsummed, started, num_appended=num_appended)
            calls["moe"] += 1
            return tri.moe_experts_lora(x, w13, w2, weights, ids, lora)

    cfg = preset_config("tiny", {"num_hidden_layers": 2})
    write_checkpoint(str(tmp_path / "base"), cfg, seed=5, head_std=0.2)
    loras = [None]
    for i, kinds in enumerate((["qkv", "dense_mlp"], list(KINDS)), 1):
        random_adapter(str(tmp_path / f"a{i}"), cfg, kinds, r=8, seed=i)
        loras.append(LoRARequest(f"a{i}", i, str(tmp_path / f"a{i}")))
    prompts = [[30 + (i * 37 + j) % 400 for i in range(12 + 3 * j)] for j in range(3)]
    sp = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=0)
    outs = []
    for kernels in (None, TritonLoRA("auto")):
        with LLM(str(tmp_path / "base"), enable_lora=True, max_loras=2, max_lora_rank=8, lora_routed_experts=True,
                 max_model_len=128, kv_cache_memory=4 << 20) as llm:
            if kernels is not None:
                llm.llm_engine.model.use_kernels(kernels)
            outs.append(llm.generate(prompts, sp, use_tqdm=False, lora_request=loras))
    assert calls["rows"] > 0 and calls["moe"] > 0
    for want, got in zip(*outs):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        for g, w, t in zip(got.prompt_logprobs[1:], want.prompt_logprobs[1:], got.prompt_token_ids[1:]):
            assert abs(g[t].logprob - w[t].logprob) < 1e-4
