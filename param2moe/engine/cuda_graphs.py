"""Decode steps replayed from CUDA graphs captured at a ladder of batch sizes.

A decode step of a small batch is hundreds of short kernel launches; replaying a captured graph
removes the launch gaps. A batch is padded up to the next captured size: padding rows write their
keys and values to the runner's scratch slot and attend to one cached token, and their logits are
dropped. Attention is captured with max_context_len = max_model_len, so the kernels size their
work from the device-side context lengths, never from a host value that changes between steps.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..model.attention import PagedAttention
from .model_runner import input_ids_on_device, to_device

log = logging.getLogger("param2moe")

_LADDER = (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512)


class CudaGraphRunner:
    def __init__(self, runner, max_batch_size: int, max_model_len: int):
        self.runner = runner
        model, dev = runner.model, runner.device
        self.sizes = [s for s in _LADDER if s <= max_batch_size] or [1]
        n = self.sizes[-1]
        self.max_blocks = -(-max_model_len // runner.block_size)
        self.input_ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.slot_mapping = torch.full((n,), runner.scratch_slot, dtype=torch.long, device=dev)
        self.block_tables = torch.zeros(n, self.max_blocks, dtype=torch.int32, device=dev)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.long, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        pool = None
        with torch.inference_mode():
            for size in reversed(self.sizes):  # largest first: the smaller graphs reuse its memory pool
                attn = PagedAttention(
                    runner.k_caches, runner.v_caches, self.slot_mapping[:size], self.block_tables[:size],
                    self.context_lens[:size], self.query_start_loc[: size + 1], max_query_len=1,
                    max_context_len=max_model_len, layer_offset=runner.layer_offset)
                step = lambda attn=attn, size=size: model.compute_logits(  # noqa: E731
                    model(self.input_ids[:size], self.positions[:size], attn))
                step()  # warm up: compile kernels, allocate workspaces outside the graph
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.logits[size] = step()
                pool = graph.pool()
                self.graphs[size] = graph
        torch.cuda.synchronize()
        log.info("captured CUDA graphs for decode batch sizes %s", self.sizes)

    def can_run(self, host: dict) -> bool:
        b = len(host["context_lens"])
        return b <= self.sizes[-1] and len(host["input_ids"]) == b and host["block_tables"].shape[1] <= self.max_blocks

    def run(self, host: dict, prev_tokens: torch.Tensor | None = None) -> torch.Tensor:
        b = len(host["context_lens"])
        size = next(s for s in self.sizes if s >= b)
        dev = self.input_ids.device
        prev_index = host.get("prev_index")
        ids = to_device(host["input_ids"], dev)
        if prev_index is not None:
            ids = input_ids_on_device(ids, to_device(prev_index, dev), prev_tokens)
        self.input_ids[:b].copy_(ids)
        self.positions[:b].copy_(to_device(host["positions"], dev))
        self.slot_mapping[:b].copy_(to_device(host["slot_mapping"], dev))
        tables = np.zeros((b, self.max_blocks), dtype=np.int32)
        tables[:, : host["block_tables"].shape[1]] = host["block_tables"]
        self.block_tables[:b].copy_(to_device(tables, dev))
        self.context_lens[:b].copy_(to_device(host["context_lens"], dev))
        if size > b:  # padding rows: scratch slot, one cached token
            self.slot_mapping[b:size].fill_(self.runner.scratch_slot)
            self.context_lens[b:size].fill_(1)
        self.graphs[size].replay()
        return self.logits[size][:b]

    def replay_seconds(self, batch: int, repeats: int = 20) -> float:
        """GPU time of one replay of the graph that serves `batch` (for benchmarks: the step's time
        without the host; inputs are whatever the last step left in the static buffers)."""
        graph = self.graphs[next(s for s in self.sizes if s >= batch)]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        graph.replay()
        start.record()
        for _ in range(repeats):
            graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / repeats
