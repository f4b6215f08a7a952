"""Steps replayed from CUDA graphs, so that the host launches one graph instead of hundreds of kernels.

Two kinds, sharing one memory pool:
- decode graphs, at a ladder of batch sizes (one new token a sequence): logits and the sampler's greedy
  choice on them come out of the graph. A batch is padded up to the next captured size: padding rows write
  their keys and values to the KV cache's scratch slot and attend to one cached token, and their logits are
  dropped.
- token graphs, at a ladder of token counts (prefills, chunked prefills, decodes mixed with them): the
  final hidden state comes out; the logits of the sampled rows are computed after it. The tokens are
  padded up to the captured count, and the padding rows form one more sequence with no context (their
  attention is zero, their keys and values go to the scratch slot); sequences past it are empty.
Attention is captured with max_context_len = max_model_len, so the kernels size their work from the
device-side context lengths, never from a host value that changes between steps.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from .kv_cache import KVCache

log = logging.getLogger("param2moe")

_DECODE_LADDER = (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448,
                  512)
# Past 128 tokens a step of this model reads most expert weights anyway, and past ~512 it is bound by the
# tensor cores: steps of 128 keep the padding's share small where it costs.
_TOKEN_LADDER = (16, 32, 64, *range(128, 1 << 16, 128))

# A graph's static inputs live in one int32 buffer, so that a step sends them in one copy. Both kinds share
# its layout (graph_input_views): a row a token of each token field, then a row a sequence of context_lens,
# query_start_loc, and the block tables last. A decode graph of size S is the layout for S tokens of S sequences.
# lora_index: each row's adapter slot, -1 for none (read only when LoRA slots are attached to the model)
_TOKEN_FIELDS = ("input_ids", "positions", "slot_mapping", "prev_index", "lora_index")  # a row a token
# a padding row's values; its slot_mapping: the scratch slot
_PADDING = {"input_ids": 0, "positions": 0, "prev_index": -1, "lora_index": -1}


def _layout(max_tokens: int, max_seqs: int, max_blocks: int) -> tuple:
    """(name, length) of each field of the input buffer, in order: each token field, then context_lens,
    query_start_loc, and the block tables last (so that a step can copy the rows it uses only)."""
    return (*((f, max_tokens) for f in _TOKEN_FIELDS), ("context_lens", max_seqs), ("query_start_loc", max_seqs + 1),
            ("block_tables", max_seqs * max_blocks))


def graph_input_views(buf, max_tokens: int, max_seqs: int, max_blocks: int) -> dict:
    """The fields of a graph's input buffer (a device tensor, or a numpy array) of graph_input_size(...)
    elements; block_tables [max_seqs, max_blocks], and block_tables_offset: where they start."""
    views, offset = {}, 0
    for name, length in _layout(max_tokens, max_seqs, max_blocks):
        views[name] = buf[offset:offset + length]
        offset += length
    views["block_tables"] = views["block_tables"].reshape(max_seqs, max_blocks)
    views["block_tables_offset"] = offset - max_seqs * max_blocks
    return views


def graph_input_size(max_tokens: int, max_seqs: int, max_blocks: int) -> int:
    return sum(length for _, length in _layout(max_tokens, max_seqs, max_blocks))


def token_sizes(max_tokens: int) -> list[int]:
    return [s for s in _TOKEN_LADDER if s <= max_tokens]


# a step of no sequences: every row padding (the inputs graphs are captured with)
_EMPTY = dict(input_ids=np.zeros(0, np.int32), context_lens=np.zeros(0, np.int32),
              query_start_loc=np.zeros(1, np.int32), block_tables=np.zeros((0, 1), np.int32))


def _fill_token_rows(f: dict, host: dict, size: int, scratch_slot: int) -> None:
    t = len(host["input_ids"])
    for name in _TOKEN_FIELDS:
        f[name][:t] = host.get(name, -1)  # prev_index / lora_index absent: no row waits / has an adapter
        f[name][t:size] = _PADDING.get(name, scratch_slot)


def fill_token_inputs(f: dict, host: dict, size: int, scratch_slot: int) -> int:
    """Writes a step's host arrays into the numpy views f of a token graph's input buffer, padded to `size`
    tokens; returns the number of leading int32 elements of the buffer the step needs (block-table rows
    past the last sequence keep stale values: no program reads them)."""
    b = len(host["context_lens"])
    _fill_token_rows(f, host, size, scratch_slot)
    f["context_lens"][:b] = host["context_lens"]
    f["context_lens"][b:] = 0
    # padding rows t..size are sequence b (no context: attention writes zeros); later sequences are empty
    f["query_start_loc"][: b + 1] = host["query_start_loc"]
    f["query_start_loc"][b + 1:] = size
    tables, bt = host["block_tables"], f["block_tables"]
    bt[:b, : tables.shape[1]] = tables
    bt[:b, tables.shape[1]:] = 0
    return f["block_tables_offset"] + b * bt.shape[1]


def fill_decode_inputs(f: dict, host: dict, size: int, scratch_slot: int) -> None:
    """Writes a decode step's host arrays (one token a sequence) into the numpy views f of the input buffer of
    the decode graph of `size` sequences. Rows b.. are padding sequences: token 0 at position 0, written to the
    scratch slot, attending to one cached token through a cleared block table."""
    b = len(host["context_lens"])
    _fill_token_rows(f, host, size, scratch_slot)
    f["context_lens"][:b] = host["context_lens"]
    f["context_lens"][b:] = 1
    f["query_start_loc"][:] = np.arange(size + 1)
    tables, bt = host["block_tables"], f["block_tables"]
    bt[:] = 0
    bt[:b, : tables.shape[1]] = tables


class CudaGraphRunner:
    def __init__(self, model, kv: KVCache, greedy, max_batch_size: int, max_model_len: int, max_tokens: int = 0):
        """Decode graphs up to max_batch_size sequences; token graphs up to max_tokens tokens of at most
        max_batch_size sequences (none when 0). The graphs run `model` over the cache `kv`; a decode graph ends
        with greedy(logits, out), the sampler's greedy choice."""
        self.model, self.kv, self.greedy, self.max_model_len = model, kv, greedy, max_model_len
        dev = kv.device
        self.sizes = [s for s in _DECODE_LADDER if s <= max_batch_size] or [1]
        self.token_sizes = token_sizes(max_tokens)
        self.max_seqs = max_batch_size + 1  # a token graph's sequences: the batch's, then one for the padding rows
        self.max_blocks = -(-max_model_len // kv.block_size)
        # The previous step's sampled ids: rows of a batch whose last token the host has not read yet
        # take it from here, inside the graph (prev_index >= 0). Each decode graph ends by writing its rows'
        # greedy ids here, after its inputs are read: with greedy sampling the next step finds its tokens in place.
        self.prev_tokens = torch.zeros(max(max_batch_size, self.sizes[-1]), dtype=torch.long, device=dev)
        # Every tensor a graph reads must outlive it (a graph keeps addresses, not references).
        self.inputs: dict = {}  # size (or "tokens") -> the static input buffer on the device
        self.staging: dict = {}  # the same keys -> two (pinned host buffer, event of its last copy)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.token_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.hidden: dict[int, torch.Tensor] = {}
        with torch.inference_mode():
            pool = self._capture_token_graphs()  # the largest activations first
            self._capture_decode_graphs(pool)
        torch.cuda.synchronize()
        log.info("captured CUDA graphs for decode batch sizes %s and steps of %s tokens", self.sizes,
                 self.token_sizes or "no")

    def _capture(self, step, pool):
        step()  # warm up: compile kernels, allocate workspaces outside the graph
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = step()
        return graph, out

    def _views(self, buf, key) -> dict:
        """The fields of the input buffer of graph `key` (a decode size, or "tokens"): a device tensor, or the
        numpy view of a staging buffer."""
        if key == "tokens":
            return graph_input_views(buf, self.token_sizes[-1], self.max_seqs, self.max_blocks)
        return graph_input_views(buf, key, key, self.max_blocks)

    def _new_inputs(self, key, fill) -> dict:
        """The device input buffer of graph `key`, filled (on the host, by fill(views)) with an all-padding step;
        returns its device views."""
        n = graph_input_size(*((self.token_sizes[-1], self.max_seqs) if key == "tokens" else (key, key)),
                             self.max_blocks)
        staged = np.zeros(n, dtype=np.int32)
        fill(self._views(staged, key))
        buf = self.inputs[key] = torch.from_numpy(staged).to(self.kv.device)
        return self._views(buf, key)

    def _attention(self, f: dict, num_tokens: int, max_query_len: int):
        return self.kv.attention(f["slot_mapping"][:num_tokens], f["block_tables"], f["context_lens"],
                                 f["query_start_loc"], max_query_len=max_query_len,
                                 max_context_len=self.max_model_len, ops=self.model.ops)

    # ------------------------------------------------------------------ decode graphs
    def _capture_decode_graphs(self, pool) -> None:
        model = self.model
        for size in reversed(self.sizes):  # largest first: the smaller graphs reuse its memory
            f = self._new_inputs(size, lambda v, size=size: fill_decode_inputs(v, _EMPTY, size, self.kv.scratch_slot))
            attn = self._attention(f, size, max_query_len=1)

            def step(attn=attn, f=f, size=size):
                hidden = model(f["input_ids"], f["positions"], attn, prev=(f["prev_index"], self.prev_tokens),
                               lora_index=f["lora_index"])
                logits = model.compute_logits(hidden)
                self.greedy(logits, out=self.prev_tokens[:size])
                return logits

            self.graphs[size], self.logits[size] = self._capture(step, pool)
            pool = self.graphs[size].pool()

    def can_run(self, host: dict) -> bool:
        b = len(host["context_lens"])
        return b <= self.sizes[-1] and len(host["input_ids"]) == b and host["block_tables"].shape[1] <= self.max_blocks

    def run(self, host: dict, prev_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Replay the decode graph of the batch's size: (logits [B, V], their greedy ids [B]). The greedy ids are
        a view of the buffer the next replay reads pending tokens from. prev_tokens: the previous step's sampled
        ids."""
        b = len(host["context_lens"])
        size = next(s for s in self.sizes if s >= b)
        buf, event = self._staging_buffer(size)
        fill_decode_inputs(self._views(buf.numpy(), size), host, size, self.kv.scratch_slot)
        self.inputs[size].copy_(buf, non_blocking=True)
        event.record()
        self._take_prev_tokens(host, prev_tokens)
        self.graphs[size].replay()
        return self.logits[size][:b], self.prev_tokens[:b]

    def _take_prev_tokens(self, host: dict, prev_tokens: torch.Tensor | None) -> None:
        if prev_tokens is not None and "prev_index" in host and prev_tokens.data_ptr() != self.prev_tokens.data_ptr():
            self.prev_tokens[: prev_tokens.numel()].copy_(prev_tokens)  # not the last replay's ids: copied in

    # ------------------------------------------------------------------ token graphs
    def _capture_token_graphs(self):
        """Token graphs of every size, on one input buffer (only one runs at a time). Returns the memory pool."""
        if not self.token_sizes:
            return None
        model, scratch = self.model, self.kv.scratch_slot
        f = self._new_inputs("tokens", lambda v: None)
        buf = self.inputs["tokens"]
        staged = np.zeros(buf.numel(), dtype=np.int32)
        pool = None
        for size in reversed(self.token_sizes):  # every row padding while capturing
            fill_token_inputs(self._views(staged, "tokens"), _EMPTY, size, scratch)
            buf.copy_(torch.from_numpy(staged))
            attn = self._attention(f, size, max_query_len=size)

            def step(attn=attn, size=size):
                return model(f["input_ids"][:size], f["positions"][:size], attn,
                             prev=(f["prev_index"][:size], self.prev_tokens), lora_index=f["lora_index"][:size])

            self.token_graphs[size], self.hidden[size] = self._capture(step, pool)
            pool = self.token_graphs[size].pool()
        return pool

    def token_graph_size(self, host: dict) -> int | None:
        """The token graph that runs this step (a token count), or None (eager)."""
        t, b = len(host["input_ids"]), len(host["context_lens"])
        if not self.token_sizes or t > self.token_sizes[-1] or b >= self.max_seqs:
            return None
        if host["block_tables"].shape[1] > self.max_blocks:
            return None
        return next(s for s in self.token_sizes if s >= t)

    def run_tokens(self, host: dict, size: int, prev_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Replay the token graph of `size` tokens: the final hidden state of the step's rows [T, H]."""
        buf, event = self._staging_buffer("tokens")
        n = fill_token_inputs(self._views(buf.numpy(), "tokens"), host, size, self.kv.scratch_slot)
        self.inputs["tokens"][:n].copy_(buf[:n], non_blocking=True)
        event.record()
        self._take_prev_tokens(host, prev_tokens)
        self.token_graphs[size].replay()
        return self.hidden[size][: len(host["input_ids"])]

    # ------------------------------------------------------------------ both
    def _staging_buffer(self, key):
        """One of two pinned host buffers for this graph's inputs, in turn; waits (rarely) until the copy
        that last read it has run, since the engine may queue a step while the one before is in flight."""
        pair = self.staging.get(key)
        if pair is None:
            n = self.inputs[key].numel()
            pair = self.staging[key] = [[torch.empty(n, dtype=torch.int32, pin_memory=True), torch.cuda.Event()]
                                        for _ in range(2)]
        pair.reverse()
        buf, event = pair[0]
        event.synchronize()  # an event never recorded counts as done
        return buf, event

    def replay_seconds(self, batch: int, repeats: int = 20) -> float:
        """GPU time of one replay of the decode graph that serves `batch` (for benchmarks: the step's time
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
