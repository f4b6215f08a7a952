"""Decode steps replayed from CUDA graphs captured at a ladder of batch sizes.

A decode step of a small batch is hundreds of short kernel launches; replaying a captured graph
removes the launch gaps. A batch is padded up to the next captured size: padding rows write their
keys and values to the runner's scratch slot and attend to one cached token, and their logits are
dropped. Attention is captured with max_context_len = max_model_len, so the kernels size their
work from the device-side context lengths, never from a host value that changes between steps.
"""

from __future__ import annotations

import logging

import torch

from .. import kernels as ops
from ..model.attention import PagedAttention

log = logging.getLogger("param2moe")

_LADDER = (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512)


# A captured size's static inputs live in one int32 buffer, so that a step sends them in one copy:
# these fields of `size` rows each, then the block tables [size, max_blocks].
_FIELDS = ("input_ids", "positions", "slot_mapping", "context_lens", "prev_index")


class CudaGraphRunner:
    def __init__(self, runner, max_batch_size: int, max_model_len: int):
        self.runner = runner
        model, dev = runner.model, runner.device
        self.sizes = [s for s in _LADDER if s <= max_batch_size] or [1]
        self.max_blocks = -(-max_model_len // runner.block_size)
        # The previous step's sampled ids: rows of a batch whose last token the host has not read yet
        # take it from here, inside the graph (prev_index >= 0). Each graph ends by writing its rows' argmax
        # here, after its inputs are read: with greedy sampling the next step finds its tokens in place.
        self.prev_tokens = torch.zeros(self.sizes[-1], dtype=torch.long, device=dev)
        # Every tensor a graph reads must outlive it (a graph keeps addresses, not references).
        self.query_start_loc = torch.arange(self.sizes[-1] + 1, dtype=torch.int32, device=dev)
        self.inputs: dict[int, torch.Tensor] = {}  # size -> the static input buffer on the device
        self.staging: dict[int, list] = {}  # size -> two (pinned host buffer, event of its last copy)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        pool = None
        with torch.inference_mode():
            for size in reversed(self.sizes):  # largest first: the smaller graphs reuse its memory pool
                buf = torch.zeros(size * (len(_FIELDS) + self.max_blocks), dtype=torch.int32, device=dev)
                self.inputs[size] = buf
                f = self._views(buf, size)
                self._pad(f, 0)
                attn = PagedAttention(
                    runner.k_caches, runner.v_caches, f["slot_mapping"], f["block_tables"], f["context_lens"],
                    self.query_start_loc[: size + 1], max_query_len=1,
                    max_context_len=max_model_len, layer_offset=runner.layer_offset)

                def step(attn=attn, f=f, size=size):
                    hidden = model(f["input_ids"], f["positions"], attn, prev=(f["prev_index"], self.prev_tokens))
                    logits = model.compute_logits(hidden)
                    ops.argmax(logits, out=self.prev_tokens[:size])
                    return logits

                step()  # warm up: compile kernels, allocate workspaces outside the graph
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.logits[size] = step()
                pool = graph.pool()
                self.graphs[size] = graph
        torch.cuda.synchronize()
        log.info("captured CUDA graphs for decode batch sizes %s", self.sizes)

    def _views(self, buf, size: int) -> dict:
        """The fields of a buffer of this size (a device tensor, or the numpy view of a staging buffer)."""
        views = {name: buf[i * size:(i + 1) * size] for i, name in enumerate(_FIELDS)}
        views["block_tables"] = buf[len(_FIELDS) * size:].reshape(size, self.max_blocks)
        return views

    def _pad(self, f: dict, b: int) -> None:
        """Rows b.. of the fields are padding: token 0 at position 0, written to the scratch slot, attending
        to one cached token; and every row's block table is cleared (rows < b get theirs after)."""
        for name, value in (("input_ids", 0), ("positions", 0), ("slot_mapping", self.runner.scratch_slot),
                            ("context_lens", 1), ("prev_index", -1)):
            f[name][b:] = value
        f["block_tables"][:] = 0

    def can_run(self, host: dict) -> bool:
        b = len(host["context_lens"])
        return b <= self.sizes[-1] and len(host["input_ids"]) == b and host["block_tables"].shape[1] <= self.max_blocks

    def run(self, host: dict, prev_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Replay the graph of the batch's size: (logits [B, V], their argmax [B]). The argmax is a view of
        the buffer the next replay reads pending tokens from. prev_tokens: the previous step's sampled ids."""
        b = len(host["context_lens"])
        size = next(s for s in self.sizes if s >= b)
        buf, event = self._staging_buffer(size)
        f = self._views(buf.numpy(), size)
        self._pad(f, b)
        for name in _FIELDS:
            f[name][:b] = host.get(name, -1)  # prev_index absent: no row waits for the previous step
        tables = host["block_tables"]
        f["block_tables"][:b, : tables.shape[1]] = tables
        self.inputs[size].copy_(buf, non_blocking=True)
        event.record()
        if prev_tokens is not None and "prev_index" in host and prev_tokens.data_ptr() != self.prev_tokens.data_ptr():
            self.prev_tokens[: prev_tokens.numel()].copy_(prev_tokens)  # not the last replay's argmax: copied in
        self.graphs[size].replay()
        return self.logits[size][:b], self.prev_tokens[:b]

    def _staging_buffer(self, size: int):
        """One of two pinned host buffers of this size, in turn; waits (rarely) until the copy that
        last read it has run, since the engine may queue a step while the one before is in flight."""
        pair = self.staging.get(size)
        if pair is None:
            n = self.inputs[size].numel()
            pair = self.staging[size] = [[torch.empty(n, dtype=torch.int32, pin_memory=True), torch.cuda.Event()]
                                         for _ in range(2)]
        pair.reverse()
        buf, event = pair[0]
        event.synchronize()  # an event never recorded counts as done
        return buf, event

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
