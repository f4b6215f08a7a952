"""Expert load balancing's host side: the placement policy, keeping experts in place, the moves between
placements, and the logical-to-physical mapping (the plain torch op, the oracle of the Triton kernel)."""

import numpy as np
import pytest
import torch

from param2moe.eplb import placement as pl
from param2moe.eplb.transfer import move_experts, plan_moves
from param2moe.kernels.routing import map_experts


def _skewed(num_experts: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.round(rng.pareto(1.2, num_experts) * 100).astype(np.int64)


@pytest.mark.parametrize("num_logical,num_physical,num_ranks", [(8, 10, 2), (16, 16, 4), (64, 72, 8), (8, 12, 1)])
def test_every_expert_placed_and_ranks_equal(num_logical, num_physical, num_ranks):
    for seed in range(5):
        load = _skewed(num_logical, seed)
        p = pl.rebalance(load, num_physical, num_ranks)
        assert p.shape == (num_physical,)
        counts = np.bincount(p, minlength=num_logical)
        assert counts.min() >= 1 and counts.sum() == num_physical  # every logical expert has a replica
        per_rank = num_physical // num_ranks
        assert all(len(p[r * per_rank:(r + 1) * per_rank]) == per_rank for r in range(num_ranks))
        assert pl.imbalance(load, p, num_ranks) <= pl.imbalance(load, pl.initial_placement(num_logical, num_physical),
                                                          num_ranks) + 1e-9


def test_hot_experts_replicated_first():
    assert pl.replicate(np.array([100, 60, 1, 1]), 6).tolist() == [2, 2, 1, 1]  # 100, then 60 (> 100/2)
    assert pl.replicate(np.array([100, 40, 1, 1]), 6).tolist() == [3, 1, 1, 1]  # 100/2 = 50 still beats 40
    load = np.array([5, 900, 7, 3, 320, 2, 4, 6])
    counts = np.bincount(pl.rebalance(load, 11, 1), minlength=8)
    assert counts.tolist() == [1, 3, 1, 1, 2, 1, 1, 1]  # the extra three: 900, 900/2 = 450 > 320, then 320 > 900/3


def test_deterministic_with_ties():
    load = np.array([10, 10, 10, 10, 5, 5, 5, 5])
    a = pl.rebalance(load, 12, 4)
    assert np.array_equal(a, pl.rebalance(load.copy(), 12, 4))
    assert np.bincount(a, minlength=8)[:4].tolist() == [2, 2, 2, 2]  # ties: the lower index first
    assert pl.balanced_packing(np.ones(6), 3).tolist() == [0, 1, 2, 0, 1, 2]


def test_balanced_packing_balances():
    w = np.array([9.0, 8, 7, 6, 5, 4, 3, 2])
    packs = pl.balanced_packing(w, 2)
    assert np.bincount(packs).tolist() == [4, 4]
    assert abs(w[packs == 0].sum() - w[packs == 1].sum()) <= 2


def test_hierarchical_keeps_groups_on_nodes():
    """Two nodes of two ranks, four groups of four experts: each node's slots hold whole groups."""
    load = _skewed(16, 3)
    p = pl.rebalance(load, 20, num_ranks=4, num_groups=4, num_nodes=2)
    assert np.bincount(p, minlength=16).min() >= 1
    for node in range(2):
        groups = set((p[node * 10:(node + 1) * 10] // 4).tolist())
        assert len(groups) == 2  # two whole groups a node
    flat = pl.rebalance(load, 20, num_ranks=4, num_groups=3, num_nodes=2)  # groups do not split over nodes: global
    assert np.array_equal(flat, pl.rebalance(load, 20, num_ranks=4))


def test_keep_slots_keeps_what_is_in_place():
    old = np.array([0, 1, 2, 3, 4, 5, 6, 7, 0, 1])
    new = np.array([2, 1, 2, 5, 4, 0, 3, 7, 6, 1])
    kept = pl.keep_slots(old, new, 2)
    for r in range(2):
        assert sorted(kept[r * 5:(r + 1) * 5].tolist()) == sorted(new[r * 5:(r + 1) * 5].tolist())
    assert kept[1] == 1 and kept[2] == 2 and kept[4] == 4  # rank 0 still wants 1, 2, 4: they stay
    assert kept[5] == 5 or 5 not in new[5:]  # rank 1 wanted 0, 3, 7, 6, 1: 6, 7, 0 and 1 stay
    assert kept[6] == 6 and kept[7] == 7 and kept[8] == 0 and kept[9] == 1


def test_update_moves_few_experts():
    """Ranks get the packs they mostly hold already; an unchanged load moves nothing."""
    old = np.array([0, 1, 2, 3, 4, 5, 6, 7, 0, 1])
    swapped = np.concatenate([old[5:], old[:5]])
    assert np.array_equal(pl.match_ranks(old, swapped, 2, 2), old)
    load = _skewed(8, 1)
    once = pl.update(old, load, 2)
    assert np.array_equal(pl.update(once, load, 2), once)  # nothing to move
    assert sorted(once.tolist()) == sorted(pl.rebalance(load, 10, 2).tolist())
    assert pl.imbalance(load, once, 2) == pytest.approx(pl.imbalance(load, pl.rebalance(load, 10, 2), 2))


def test_moves_turn_old_into_new():
    """One rank (no communication): each slot's rows end up holding its new expert's weights."""
    old = np.array([0, 1, 2, 3, -1, -1])
    new = np.array([3, 1, 2, 0, 3, 0])
    w = torch.tensor([[0.0], [1.0], [2.0], [3.0], [99.0], [99.0]])
    q = torch.arange(6, dtype=torch.int8)[:, None].repeat(1, 3)
    moved = move_experts([w, q], old, new, rank=0, num_ranks=1)
    assert w[:, 0].tolist() == [3.0, 1.0, 2.0, 0.0, 3.0, 0.0]
    assert q[:, 0].tolist() == [3, 1, 2, 0, 3, 0]
    assert moved == 4
    with pytest.raises(ValueError, match="expert 5 is in no slot"):
        plan_moves(old, np.array([5, 1, 2, 3, 0, 0]), 1)


def test_quantized_experts_move_with_their_scales():
    """A quantized stack (codes and scales) moves as a whole: each slot dequantizes to its new expert."""
    from types import SimpleNamespace

    from param2moe.eplb.transfer import expert_tensors
    from param2moe.quant.formats import dequantize, quantize

    w = torch.randn(4, 6, 8)
    moe = SimpleNamespace(w13=quantize(w, "int8"), w2=torch.arange(4.0)[:, None, None].repeat(1, 2, 3))
    assert len(expert_tensors(moe)) == 3  # codes, scales, w2
    move_experts(expert_tensors(moe), np.array([0, 1, 2, 3]), np.array([2, 1, 3, 2]), rank=0, num_ranks=1)
    want = dequantize(quantize(w, "int8"))[[2, 1, 3, 2]]
    assert torch.equal(dequantize(moe.w13), want) and moe.w2[:, 0, 0].tolist() == [2.0, 1.0, 3.0, 2.0]


def test_logical_to_physical_table():
    table, counts = pl.logical_to_physical(np.array([2, 0, 1, 2, 0, 2]), 3, 4)
    assert counts.tolist() == [2, 1, 3]
    assert table.tolist() == [[1, 4, -1, -1], [2, -1, -1, -1], [0, 3, 5, -1]]
    with pytest.raises(ValueError, match="without a replica"):
        pl.logical_to_physical(np.array([0, 0, 1]), 3, 3)


def test_map_experts_spreads_counts_and_localises():
    table = torch.tensor([[1, 4], [2, -1], [0, 3]])  # expert 0 in slots 1 and 4, 1 in 2, 2 in 0 and 3
    counts = torch.tensor([2, 1, 2])
    ids = torch.tensor([[0, 2], [0, 1], [0, 3], [2, 3]])  # 3: the folded shared expert's piece (appended)
    load = torch.zeros(3, dtype=torch.int32)
    slots = torch.tensor([7, 8, 9, 100])  # row 3 is padding (slot 100)
    phys = map_experts(ids, table, counts, 5, load, slots, padding_slot=100)
    # pair i takes replica i % count: pairs 0, 2, 4 of expert 0 -> slots 1, 1, 1; pairs 1 and 6 of expert 2 -> 3, 0
    assert phys.tolist() == [[1, 3], [1, 2], [1, 5], [0, 5]]
    assert load.tolist() == [3, 1, 1]  # padding row and appended ids not counted
    spread = map_experts(torch.tensor([[0], [0], [0], [0]]), table, counts, 5)
    assert spread.reshape(-1).tolist() == [1, 4, 1, 4]
    local = map_experts(ids, table, counts, 5, local=(0, 3))
    assert local.tolist() == [[1, -1], [1, 2], [1, -1], [0, -1]]
