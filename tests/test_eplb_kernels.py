"""The Triton logical-to-physical expert map (kernels/triton/routing.map_experts) against its torch oracle, on
CUDA or under Triton's interpreter on the CPU."""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from param2moe.eplb.placement import logical_to_physical, rebalance  # noqa: E402
from param2moe.kernels import routing as ref  # noqa: E402
from param2moe.kernels.triton import routing as tri  # noqa: E402

DEV = "cuda" if CUDA else "cpu"


@pytest.mark.parametrize("tokens,num_logical,num_physical,top_k,appended,local", [
    (1, 8, 10, 2, 0, None), (37, 16, 20, 4, 0, (10, 20)), (64, 64, 72, 6, 2, None), (5, 8, 8, 2, 0, (0, 4))])
def test_map_experts_matches_oracle(tokens, num_logical, num_physical, top_k, appended, local):
    g = torch.Generator().manual_seed(tokens)
    load = torch.randint(0, 1000, (num_logical,), generator=g).numpy()
    placement = rebalance(load, num_physical, 2 if num_physical % 2 == 0 else 1)
    table, counts = (torch.from_numpy(a).to(DEV) for a in logical_to_physical(placement, num_logical,
                                                                              1 + num_physical - num_logical))
    ids = torch.stack([torch.randperm(num_logical, generator=g)[:top_k] for _ in range(tokens)])
    if appended:
        ids = torch.cat([ids, torch.arange(num_logical, num_logical + appended).expand(tokens, -1)], dim=1)
    ids = ids.to(DEV)
    slots = torch.randint(0, 50, (tokens,), generator=g).to(DEV)
    slots[::3] = 999  # padding rows
    want_load = torch.zeros(num_logical, dtype=torch.int32, device=DEV)
    got_load = torch.full((num_logical,), 0, dtype=torch.int32, device=DEV)
    want = ref.map_experts(ids, table, counts, num_physical, want_load, slots, 999, local)
    got = tri.map_experts(ids, table, counts, num_physical, got_load, slots, 999, local)
    assert torch.equal(got, want)
    assert torch.equal(got_load, want_load) and int(want_load.sum()) == top_k * (tokens - len(range(0, tokens, 3)))
    plain = tri.map_experts(ids, table, counts, num_physical)  # no counting, physical ids
    assert torch.equal(plain, ref.map_experts(ids, table, counts, num_physical))
