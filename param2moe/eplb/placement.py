"""Where each expert goes: the placement of logical experts onto physical slots, from their measured load.

The policy is DeepSeek's expert-parallel load balancer (EPLB), written here from its description:

1. replication: `num_physical` slots for `num_logical` experts; each extra slot goes, one at a time, to the
   expert whose replicas are busiest (load / replicas, largest first), so hot experts are replicated first;
2. packing: the replicas (each carrying load / replicas of its expert) go onto the ranks, heaviest first, each to
   the lightest rank that still has a free slot, so every rank holds the same number of slots;
3. hierarchical form (several nodes, expert groups divisible by them): the groups are first packed onto nodes
   the same way, then steps 1-2 run within each node, so a token's experts stay on few nodes.

Everything here is plain Python on host numbers, deterministic (ties go to the lower index) so that every rank
computes the same placement from the same loads. A placement is `phy2log` [num_physical]: the logical expert
in each physical slot; physical slot p lives on rank p // (num_physical / num_ranks).
"""

from __future__ import annotations

import numpy as np


def replicate(load: np.ndarray, num_physical: int) -> np.ndarray:
    """Replicas per expert [num_logical] (each >= 1, summing to num_physical): every extra replica goes to the
    expert with the largest load per replica."""
    load = np.asarray(load, dtype=np.float64)
    if num_physical < len(load):
        raise ValueError(f"{num_physical} physical slots cannot hold {len(load)} logical experts")
    counts = np.ones(len(load), dtype=np.int64)
    for _ in range(num_physical - len(load)):
        counts[int(np.argmax(load / counts))] += 1  # argmax: the first of equal maxima
    return counts


def balanced_packing(weights: np.ndarray, num_packs: int) -> np.ndarray:
    """Pack items into num_packs packs of equal size (len(weights) / num_packs items each), heaviest item first
    into the lightest pack with room. Returns the pack of each item [n]."""
    n = len(weights)
    if n % num_packs:
        raise ValueError(f"{n} items do not split evenly into {num_packs} packs")
    per_pack = n // num_packs
    pack_of = np.empty(n, dtype=np.int64)
    pack_load = np.zeros(num_packs, dtype=np.float64)
    pack_size = np.zeros(num_packs, dtype=np.int64)
    for item in np.argsort(-np.asarray(weights, dtype=np.float64), kind="stable"):
        open_packs = np.flatnonzero(pack_size < per_pack)
        pack = int(open_packs[np.argmin(pack_load[open_packs])])
        pack_of[item] = pack
        pack_load[pack] += weights[item]
        pack_size[pack] += 1
    return pack_of


def _place_on_ranks(experts: np.ndarray, load: np.ndarray, num_slots: int, num_ranks: int) -> np.ndarray:
    """The global policy over a subset of experts (ids `experts`, loads `load`): num_slots slots on num_ranks
    ranks. Returns the logical id in each slot, rank by rank."""
    counts = replicate(load, num_slots)
    replica_expert = np.repeat(np.arange(len(experts)), counts)  # one entry a replica
    replica_load = (load / counts)[replica_expert]
    rank_of = balanced_packing(replica_load, num_ranks)
    order = np.lexsort((np.arange(num_slots), rank_of))  # rank by rank, replicas in their packing order
    return experts[replica_expert[order]]


def rebalance(load: np.ndarray, num_physical: int, num_ranks: int, num_groups: int = 1,
              num_nodes: int = 1) -> np.ndarray:
    """The placement for one layer: phy2log [num_physical] from the load of each logical expert [num_logical].
    With num_nodes > 1 and expert groups divisible by it, the hierarchical policy; else the global one."""
    load = np.asarray(load, dtype=np.float64)
    num_logical = len(load)
    if num_physical % num_ranks:
        raise ValueError(f"num_physical_experts ({num_physical}) must be a multiple of the ranks ({num_ranks})")
    hierarchical = (num_nodes > 1 and num_groups % num_nodes == 0 and num_logical % num_groups == 0
                    and num_ranks % num_nodes == 0 and num_physical % num_nodes == 0)
    if not hierarchical:
        return _place_on_ranks(np.arange(num_logical), load, num_physical, num_ranks)
    group_size = num_logical // num_groups
    node_of_group = balanced_packing(load.reshape(num_groups, group_size).sum(1), num_nodes)
    parts = []
    for node in range(num_nodes):
        groups = np.flatnonzero(node_of_group == node)
        experts = (groups[:, None] * group_size + np.arange(group_size)).reshape(-1)
        parts.append(_place_on_ranks(experts, load[experts], num_physical // num_nodes, num_ranks // num_nodes))
    return np.concatenate(parts)


def update(old: np.ndarray, load: np.ndarray, num_ranks: int, num_groups: int = 1, num_nodes: int = 1) -> np.ndarray:
    """The next placement of a layer now in placement `old`: `rebalance` for the load, then, among equally
    balanced layouts, the one that moves the fewest experts (`match_ranks`, `keep_slots`)."""
    new = rebalance(load, len(old), num_ranks, num_groups, num_nodes)
    nodes = num_nodes if num_ranks % num_nodes == 0 else 1
    return keep_slots(old, match_ranks(old, new, num_ranks, num_ranks // nodes), num_ranks)


def match_ranks(old: np.ndarray, new: np.ndarray, num_ranks: int, ranks_per_node: int) -> np.ndarray:
    """`new` with its ranks' sets of experts handed to the ranks (of the same node) that already hold most of
    them: the packing numbers its packs arbitrarily."""
    per_rank = len(new) // num_ranks
    blocks = [new[r * per_rank:(r + 1) * per_rank] for r in range(num_ranks)]
    out = np.empty_like(new)
    for first in range(0, num_ranks, ranks_per_node):
        ranks = range(first, first + ranks_per_node)
        overlap = {(a, b): _common(blocks[a], old[b * per_rank:(b + 1) * per_rank]) for a in ranks for b in ranks}
        free_packs, free_ranks = set(ranks), set(ranks)
        for (a, b), _ in sorted(overlap.items(), key=lambda kv: (-kv[1], kv[0])):  # most in common first
            if a in free_packs and b in free_ranks:
                out[b * per_rank:(b + 1) * per_rank] = blocks[a]
                free_packs.discard(a)
                free_ranks.discard(b)
    return out


def _common(a: np.ndarray, b: np.ndarray) -> int:
    """Size of the multiset intersection."""
    ca, cb = np.unique(a, return_counts=True), np.unique(b, return_counts=True)
    both = dict(zip(*ca))
    return int(sum(min(both.get(e, 0), n) for e, n in zip(*cb)))


def keep_slots(old: np.ndarray, new: np.ndarray, num_ranks: int) -> np.ndarray:
    """`new` with each rank's experts reordered among that rank's slots so that an expert the rank already
    holds stays in its slot (fewer weights to move); which experts a rank holds is unchanged."""
    per_rank = len(new) // num_ranks
    out = np.empty_like(new)
    for r in range(num_ranks):
        lo, hi = r * per_rank, (r + 1) * per_rank
        wanted = sorted(new[lo:hi].tolist())
        slots = [-1] * per_rank
        for s in range(per_rank):  # keep what is in place
            if old[lo + s] in wanted:
                wanted.remove(old[lo + s])
                slots[s] = old[lo + s]
        rest = iter(wanted)
        out[lo:hi] = [e if e >= 0 else next(rest) for e in slots]
    return out


def logical_to_physical(phy2log: np.ndarray, num_logical: int, max_replicas: int) -> tuple[np.ndarray, np.ndarray]:
    """(table [num_logical, max_replicas]: the physical slots of each expert in ascending order, -1 past its
    count; counts [num_logical])."""
    table = np.full((num_logical, max_replicas), -1, dtype=np.int64)
    counts = np.zeros(num_logical, dtype=np.int64)
    for p, e in enumerate(phy2log.tolist()):
        if counts[e] >= max_replicas:
            raise ValueError(f"expert {e} has more than {max_replicas} replicas")
        table[e, counts[e]] = p
        counts[e] += 1
    if (counts == 0).any():
        raise ValueError(f"experts without a replica: {np.flatnonzero(counts == 0).tolist()}")
    return table, counts


def rank_loads(load: np.ndarray, phy2log: np.ndarray, num_ranks: int) -> np.ndarray:
    """Tokens each rank computes [num_ranks] when each expert's tokens split evenly over its replicas."""
    counts = np.bincount(phy2log, minlength=len(load))
    per_slot = np.asarray(load, dtype=np.float64)[phy2log] / counts[phy2log]
    return per_slot.reshape(num_ranks, -1).sum(1)


def imbalance(load: np.ndarray, phy2log: np.ndarray, num_ranks: int) -> float:
    """Busiest rank's load over the mean rank load (1.0: balanced; 1.0 when there is no load)."""
    ranks = rank_loads(load, phy2log, num_ranks)
    mean = ranks.mean()
    return float(ranks.max() / mean) if mean > 0 else 1.0


def initial_placement(num_logical: int, num_physical: int) -> np.ndarray:
    """Before any load is measured: expert p in slot p, the extra slots hold experts 0, 1, ... again."""
    return np.arange(num_physical) % num_logical
