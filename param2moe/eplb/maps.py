"""The device side of expert load balancing: each MoE layer's logical-to-physical map and its load counter.

Everything here is a tensor of fixed shape made once, before any CUDA graph is captured, and only ever
updated in place (a new placement is copied into the same storage), so graphs captured with it stay valid.
Per MoE layer of this rank:

- `table` [L, R]: the physical slots of each logical expert (R = 1 + num_redundant_experts, -1 past its count)
  and `counts` [L]: its replicas; a (token, k) pair i takes replica i % count of its expert (kernels.map_experts);
- `load` [L] int32: the pairs routed to each logical expert during the current step (padding rows of a
  CUDA-graph step not counted), moved into a ring of the last `window_size` steps at the end of each step.

Counting logical experts (not physical slots) keeps the window meaningful across rearrangements.
"""

from __future__ import annotations

import numpy as np
import torch

from .placement import logical_to_physical


class ExpertMaps:
    def __init__(self, num_layers: int, num_logical: int, num_physical: int, window_size: int, device,
                 local: tuple[int, int] | None, padding_slot: int):
        self.num_logical, self.num_physical = num_logical, num_physical
        self.max_replicas = 1 + num_physical - num_logical
        self.local, self.padding_slot = local, padding_slot
        self.table = torch.full((num_layers, num_logical, self.max_replicas), -1, dtype=torch.int64, device=device)
        self.counts = torch.ones(num_layers, num_logical, dtype=torch.int64, device=device)
        self.load = torch.zeros(num_layers, num_logical, dtype=torch.int32, device=device)
        self.window = torch.zeros(window_size, num_layers, num_logical, dtype=torch.int32, device=device)
        self.steps = 0  # steps counted so far (the ring's next row is steps % window_size)
        self.slots = None  # the current step's KV slots [T] (rows at padding_slot are padding)

    def layer(self, i: int) -> LayerMap:
        return LayerMap(self, i)

    def begin_step(self, slot_mapping: torch.Tensor | None) -> None:
        self.slots = slot_mapping

    def end_step(self) -> None:
        """This step's counts into the window (device work queued behind the step; no host sync)."""
        self.window[self.steps % self.window.shape[0]].copy_(self.load)
        self.load.zero_()
        self.steps += 1

    def window_load(self) -> torch.Tensor:
        """Pairs routed to each logical expert over the window [layers, L] int64 (on the device)."""
        return self.window.sum(0, dtype=torch.int64)

    def set_placement(self, phy2log: np.ndarray) -> None:
        """Copy a placement [layers, num_physical] into the maps, in place."""
        tables, counts = zip(*(logical_to_physical(p, self.num_logical, self.max_replicas) for p in phy2log))
        self.table.copy_(torch.from_numpy(np.stack(tables)))
        self.counts.copy_(torch.from_numpy(np.stack(counts)))


class LayerMap:
    """What a MoE layer calls on its router's ids: `expert_map(ops, ids)` -> this rank's slot of each pair's
    replica (-1 where another rank holds it; the physical ids with one rank), its load counted."""

    def __init__(self, maps: ExpertMaps, index: int):
        self.maps, self.index = maps, index

    def __call__(self, ops, ids: torch.Tensor) -> torch.Tensor:
        m, i = self.maps, self.index
        return ops.map_experts(ids, m.table[i], m.counts[i], m.num_physical, m.load[i], m.slots, m.padding_slot,
                               m.local)
