"""Expert load balancing on one rank: the placement of its MoE layers' experts, the load statistics, and the
rearrangement between steps.

The model runner calls `end_step()` after each step and, when the driver's plan says so (`due()` on the
driver, every `eplb_step_interval` steps), `rearrange()` before a step: every rank of the expert-parallel
group takes the driver's load window, computes the same new placement (placement.py), moves its expert
weights (transfer.py) and updates its maps (maps.py) in place. Requests in flight are unaffected: their
tokens go to the same experts, now held in other slots.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from .maps import ExpertMaps
from .placement import imbalance, initial_placement, rank_loads, update
from .transfer import expert_tensors, move_experts

log = logging.getLogger("param2moe")

SNAPSHOT_STEPS = 16  # the driver copies the load window to the host this often, for /metrics (no sync)


@dataclass
class ExpertLoad:
    """Load statistics of the MoE layers (rows: `layers`, the model's layer indices)."""

    layers: list[int]
    tokens: np.ndarray  # [layers, logical experts]: (token, expert) pairs routed to each over the window
    placement: np.ndarray  # [layers, physical experts]: the logical expert in each physical slot
    num_ranks: int
    window_steps: int  # steps the window holds so far (at most eplb_window_size)
    rearrangements: int

    @property
    def rank_load(self) -> np.ndarray:
        """[layers, ranks]: pairs each rank computes, each expert's split evenly over its replicas."""
        return np.stack([rank_loads(t, p, self.num_ranks) for t, p in zip(self.tokens, self.placement)])

    @property
    def imbalance(self) -> np.ndarray:
        """[layers]: the busiest rank's load over the mean rank load (1.0: balanced)."""
        return np.array([imbalance(t, p, self.num_ranks) for t, p in zip(self.tokens, self.placement)])


class ExpertBalancer:
    def __init__(self, model, config, padding_slot: int, dummy_weights: bool = False):
        self.model, self.shard = model, model.shard
        self.moes = model.moe_layers
        self.layers = [int(name.split(".")[2]) for name, m in model.named_modules() if m in self.moes]
        self.num_logical, self.num_physical = model.num_logical_experts, model.num_physical_experts
        self.num_ranks = self.shard.ep_size
        self.rank = self.shard.tp_rank if self.num_ranks > 1 else 0
        self.group = self.shard.tp_group if self.num_ranks > 1 else None
        self.num_groups = model.config.n_group or 1
        self.num_nodes = _num_nodes()
        self.step_interval = config.eplb_step_interval
        device = next(model.parameters()).device
        first = self.moes[0]
        local = (first.expert_start, first.expert_end) if self.num_ranks > 1 else None
        self.maps = ExpertMaps(len(self.moes), self.num_logical, self.num_physical, config.eplb_window_size, device,
                               local, padding_slot)
        self.placement = np.stack([initial_placement(self.num_logical, self.num_physical)] * len(self.moes))
        self.maps.set_placement(self.placement)
        model.set_eplb_state(self.maps)
        if dummy_weights:  # random weights differ slot by slot: make each replica a copy of its expert
            unset = np.where(np.arange(self.num_physical) < self.num_logical, self.placement[0], -1)
            self._move(np.stack([unset] * len(self.moes)), self.placement)
        self.rearrangements = 0
        self.steps_since = 0
        self._snapshot, self._pending = None, None

    # ------------------------------------------------------------------ each step
    def due(self) -> bool:
        """On the driver: whether the next step rearranges first."""
        return self.steps_since >= self.step_interval

    def end_step(self) -> None:
        self.maps.end_step()
        self.steps_since += 1
        if self.maps.steps % SNAPSHOT_STEPS == 0:
            self._refresh_snapshot()

    # ------------------------------------------------------------------ rearranging
    def rearrange(self) -> None:
        """New placement from the load window, weights moved, maps updated. Every rank of the group, together."""
        start = time.perf_counter()
        tokens = self.maps.window_load()
        if self.group is not None:  # the driver's counts decide (every rank counts the same tokens anyway)
            dist.broadcast(tokens, src=dist.get_global_rank(self.group, 0), group=self.group)
        tokens = tokens.cpu().numpy()
        new = np.stack([update(old, t, self.num_ranks, self.num_groups, self.num_nodes)
                        for t, old in zip(tokens, self.placement)])
        before = np.mean([imbalance(t, p, self.num_ranks) for t, p in zip(tokens, self.placement)])
        moved = self._move(self.placement, new)
        self.placement = new
        self.maps.set_placement(new)
        self.rearrangements += 1
        self.steps_since = 0
        after = np.mean([imbalance(t, p, self.num_ranks) for t, p in zip(tokens, new)])
        log.info("eplb: experts rearranged in %.0f ms (%d slots rewritten on this rank); imbalance %.3f -> %.3f",
                 1e3 * (time.perf_counter() - start), moved, before, after)

    def _move(self, old: np.ndarray, new: np.ndarray) -> int:
        moved = 0
        with torch.inference_mode():
            for moe, o, n in zip(self.moes, old, new):
                moved += move_experts(expert_tensors(moe), o, n, self.rank, self.num_ranks, self.group)
        per_rank = self.num_physical // self.num_ranks
        self.model.update_physical_experts_metadata([p[self.rank * per_rank:(self.rank + 1) * per_rank].tolist()
                                                     for p in new])
        return moved

    # ------------------------------------------------------------------ statistics
    def expert_load(self) -> ExpertLoad:
        """The statistics now (reads the device: a sync)."""
        return self._report(self.maps.window_load().cpu().numpy())

    def snapshot(self) -> ExpertLoad | None:
        """The statistics as of the last few steps, without touching the device (any thread); None before the
        first copy arrived."""
        return self._snapshot

    def _refresh_snapshot(self) -> None:
        tokens = self.maps.window_load()
        if not tokens.is_cuda:
            self._snapshot = self._report(tokens.numpy())
            return
        if self._pending is not None and self._pending[1].query():  # the copy started last time has landed
            self._snapshot = self._report(self._pending[0].numpy().copy())
            self._pending = None
        if self._pending is None:
            host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            host.copy_(tokens, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending = (host, event)

    def _report(self, tokens: np.ndarray) -> ExpertLoad:
        return ExpertLoad(self.layers, tokens, self.placement.copy(), self.num_ranks,
                          min(self.maps.steps, self.maps.window.shape[0]), self.rearrangements)


def _num_nodes() -> int:
    """Machines in the job (torchrun sets LOCAL_WORLD_SIZE; one machine otherwise)."""
    world, local = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_WORLD_SIZE", "0"))
    return world // local if local and world % local == 0 else 1
