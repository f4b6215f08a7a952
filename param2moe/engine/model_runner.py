"""Runs one scheduled batch through the network. Owns the KV cache.

The driver turns a scheduled batch into a `StepPlan`: plain arrays (token ids, positions, KV slots,
block tables) for one or more micro-batches, plus which rows need logits. With several processes
(tensor or pipeline parallel) the driver broadcasts the plan and every rank runs `run_plan` on it in
lockstep; a pipeline stage passes its hidden state to the next, so stage k works on micro-batch m
while stage k+1 works on micro-batch m-1. The driver sits on the last stage, where the logits are.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field

import numpy as np
import torch

from ..model.attention import PagedAttention
from .kv_cache import KVCache
from .scheduler import ScheduledBatch


def to_device(a: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host array on the device without waiting for queued GPU work: a copy from pageable memory
    may synchronise with the stream, which would undo the engine's overlap, so CUDA copies go through
    (cached) pinned memory."""
    t = torch.from_numpy(a) if isinstance(a, np.ndarray) else a
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


@dataclass
class MicroBatch:
    arrays: dict[str, np.ndarray]  # input_ids, positions, slot_mapping, block_tables, context_lens, query_start_loc
    # (and prev_index: per input row, the row of the previous step's sampled ids it takes, or -1; lora_index:
    # each row's adapter slot or -1, present when some row has an adapter)
    logit_rows: list[int]  # rows (tokens) whose next-token logits are sampled
    prompt_ranges: list[tuple[int, int]] = field(default_factory=list)  # row ranges whose logits give prompt logprobs
    use_graph: bool = False  # a pure decode step: replayed from a decode graph
    token_graph: int = 0  # else the token count of the token graph that replays it (0: eager)

    @property
    def num_tokens(self) -> int:
        return len(self.arrays["input_ids"])


@dataclass
class StepPlan:
    microbatches: list[MicroBatch]
    num_prev_tokens: int = 0  # > 0: inputs wait for the previous step's sampled ids (sent by the driver)
    rearrange_experts: bool = False  # expert load balancing: every rank rearranges its experts before the step


@dataclass
class StepOutput:
    sample_logits: torch.Tensor | None  # [S, V] float32, one row per sampled sequence
    sampled_rows: list[int]  # which entries of the batch were sampled, in the order of the rows
    prompt_logits: dict[int, tuple[int, torch.Tensor]]  # batch entry -> (first position, logits of its range)
    greedy_ids: torch.Tensor | None = None  # each sampled row's greedy choice, when the decode graph made it


class ModelRunner:
    def __init__(self, model, num_blocks: int, block_size: int, device, max_model_len: int, comm=None,
                 num_microbatches: int = 1):
        self.model, self.device, self.block_size = model, torch.device(device), block_size
        self.comm = comm  # broadcasts plans to the other ranks (distributed/), or None
        self.num_microbatches = num_microbatches
        model.init_rope(max(max_model_len, model.config.max_position_embeddings))
        self.kv = KVCache(model, num_blocks, block_size, self.device)
        self.graphs = None  # CudaGraphRunner, set by enable_cuda_graphs()
        self.prev_tokens = None  # the previous step's sampled ids (device), for inputs still pending
        self.eplb = None  # eplb.ExpertBalancer with expert load balancing (set before graphs are captured)

    def enable_cuda_graphs(self, max_batch_size: int, max_model_len: int, max_tokens: int, greedy) -> None:
        """greedy(logits, out): the sampler's greedy choice, which the decode graphs run on their logits."""
        from .cuda_graphs import CudaGraphRunner

        self.graphs = CudaGraphRunner(self.model, self.kv, greedy, max_batch_size, max_model_len, max_tokens)

    def release_cuda_graphs(self) -> None:
        """Free the captured graphs. Before destroying a process group: NCCL cannot tear down a communicator
        whose collectives live on in captured graphs (the destroy hangs, pytorch/pytorch#115388)."""
        if self.graphs is not None:
            torch.cuda.synchronize(self.device)
            self.graphs = None
            gc.collect()

    # ------------------------------------------------------------------ the driver's side
    def _arrays(self, batch: ScheduledBatch, lo: int, hi: int, prev_rows: dict[int, int]) -> dict[str, np.ndarray]:
        """Host-side arrays of batch entries lo..hi (numpy), built without touching the device. A
        sequence whose last token is still on the device (pending) takes it from the previous step's
        sampled ids: prev_rows maps its seq_id to its row there."""
        bs, seqs, counts = self.block_size, batch.seqs[lo:hi], batch.num_new_tokens[lo:hi]
        width = max(len(seq.block_table) for seq in seqs)
        tables = np.zeros((len(seqs), width), dtype=np.int32)
        starts = np.empty(len(seqs), dtype=np.int64)
        ids: list[int] = []
        pending: list[tuple[int, int]] = []  # (row, row of the previous step's sampled ids)
        for b, seq in enumerate(seqs):
            tables[b, : len(seq.block_table)] = seq.block_table
            s = starts[b] = seq.num_computed_tokens
            known = seq.token_ids[s:s + counts[b]]
            ids.extend(known)
            if len(known) < counts[b]:  # its last token is pending: a placeholder, replaced on the device
                ids.append(0)
                pending.append((len(ids) - 1, prev_rows[seq.seq_id]))
        n = np.asarray(counts, dtype=np.int64)
        q_start = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum(n, out=q_start[1:])
        seq_index = np.repeat(np.arange(len(seqs)), n)
        positions = np.arange(q_start[-1]) - np.repeat(q_start[:-1], n) + np.repeat(starts, n)
        slots = tables[seq_index, positions // bs].astype(np.int64) * bs + positions % bs
        arrays = dict(input_ids=np.asarray(ids, dtype=np.int64), positions=positions, slot_mapping=slots,
                      block_tables=tables, context_lens=(starts + n).astype(np.int32), query_start_loc=q_start)
        lora_slots = [seq.lora_slot for seq in seqs]
        if max(lora_slots) >= 0:  # absent: no row has an adapter (graphs then read -1)
            arrays["lora_index"] = np.repeat(np.asarray(lora_slots, dtype=np.int32), n)
        if pending:
            prev_index = np.full(len(ids), -1, dtype=np.int64)
            rows, src = zip(*pending)
            prev_index[list(rows)] = src
            arrays["prev_index"] = prev_index
        return arrays

    def plan(self, batch: ScheduledBatch, prev_rows: dict[int, int],
             ) -> tuple[StepPlan, list[int], list[tuple[int, int]]]:
        """The step's micro-batches (contiguous runs of the batch, of similar token counts), the batch
        entries that are sampled, and (entry, first prompt position) of each prompt-logprob range."""
        bounds = _split(batch.num_new_tokens, self.num_microbatches)
        microbatches, sampled, prompt = [], [], []
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            arrays = self._arrays(batch, lo, hi, prev_rows)
            q_start = arrays["query_start_loc"]
            mb = MicroBatch(arrays, [])
            for b in range(lo, hi):
                seq, n = batch.seqs[b], batch.num_new_tokens[b]
                s, row0 = seq.num_computed_tokens, int(q_start[b - lo])
                if s + n == seq.num_tokens:  # reaches the end: sample the next token
                    sampled.append(b)
                    mb.logit_rows.append(row0 + n - 1)
                if seq.needs_prompt_logprobs:
                    first = len(seq.prompt_logprobs) - 1  # position whose next token has no logprob yet
                    last = min(s + n, seq.num_prompt_tokens - 1)  # positions < last predict a prompt token
                    if last > first:
                        mb.prompt_ranges.append((row0 + first - s, row0 + last - s))
                        prompt.append((b, first))
            if self.graphs is not None and not mb.prompt_ranges:
                mb.use_graph = len(mb.logit_rows) == mb.num_tokens and self.graphs.can_run(arrays)
                mb.token_graph = 0 if mb.use_graph else self.graphs.token_graph_size(arrays) or 0
            microbatches.append(mb)
        return StepPlan(microbatches), sampled, prompt

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, prev_tokens: torch.Tensor | None = None,
                prev_rows: dict[int, int] | None = None) -> StepOutput:
        """Run the batch. prev_tokens: the previous step's sampled ids on the device, for the
        sequences whose last token the host has not read yet (rows by seq_id in prev_rows)."""
        plan, sampled, prompt = self.plan(batch, prev_rows or {})
        needs_prev = any("prev_index" in mb.arrays for mb in plan.microbatches)
        self.prev_tokens = prev_tokens if needs_prev else None
        plan.num_prev_tokens = prev_tokens.numel() if needs_prev else 0
        plan.rearrange_experts = self.eplb is not None and self.eplb.due()
        if self.comm is not None:
            self.comm.broadcast_plan(plan)
        logits, prompt_logits, greedy_ids = self.run_plan(plan)
        return StepOutput(logits, sampled, {b: (first, lg) for (b, first), lg in zip(prompt, prompt_logits)},
                          greedy_ids)

    # ------------------------------------------------------------------ every rank
    def _attention(self, arrays: dict) -> tuple[PagedAttention, torch.Tensor, torch.Tensor, tuple | None,
                                               torch.Tensor | None]:
        t = {k: to_device(v, self.device) for k, v in arrays.items()}
        attn = self.kv.attention(t["slot_mapping"], t["block_tables"], t["context_lens"], t["query_start_loc"],
                                 max_query_len=int(np.diff(arrays["query_start_loc"]).max()),
                                 max_context_len=int(arrays["context_lens"].max()), ops=self.model.ops)
        prev = (t["prev_index"], self.prev_tokens) if "prev_index" in t else None
        return attn, t["input_ids"], t["positions"], prev, t.get("lora_index")

    @torch.inference_mode()
    def run_plan(self, plan: StepPlan) -> tuple[torch.Tensor | None, list[torch.Tensor], torch.Tensor | None]:
        """Run this rank's layers over the plan. On the last stage: (logits of the sampled rows, the
        logits of each prompt-logprob range, their greedy ids when a decode graph made them); elsewhere
        (None, [], None)."""
        shard, model = self.model.shard, self.model
        if plan.rearrange_experts:  # between steps: queued behind the previous one, before this one reads weights
            self.eplb.rearrange()
        if plan.num_prev_tokens and shard.tp_size > 1:  # the driver's sampled ids, to every rank
            if self.comm is None:  # a worker
                self.prev_tokens = torch.empty(plan.num_prev_tokens, dtype=torch.long, device=self.device)
            shard.broadcast_from_driver(self.prev_tokens)
        logits, prompt_logits, sends = [], [], []
        greedy_ids = None
        for mb in plan.microbatches:
            if mb.use_graph:  # single stage, decode only: logits (and greedy ids) of every row come out of the graph
                lg, greedy_ids = self.graphs.run(mb.arrays, self.prev_tokens)
                logits.append(lg)
                continue
            if mb.token_graph:  # single stage: the final hidden state comes out of the graph
                out = self.graphs.run_tokens(mb.arrays, mb.token_graph, self.prev_tokens)
            else:
                attn, input_ids, positions, prev, lora_index = self._attention(mb.arrays)
                if shard.is_first_stage:
                    out = model(input_ids, positions, attn, prev=prev, lora_index=lora_index)
                else:
                    hidden, residual = shard.recv_from_prev_stage(mb.num_tokens, model.config.hidden_size,
                                                                  model.dtype, self.device)
                    out = model(input_ids, positions, attn, hidden=hidden, residual=residual,
                                lora_index=lora_index)
            if not shard.is_last_stage:
                sends.extend(shard.send_to_next_stage(*out))
                continue
            if mb.logit_rows:
                logits.append(model.compute_logits(out[mb.logit_rows]))
            prompt_logits.extend(model.compute_logits(out[a:b]) for a, b in mb.prompt_ranges)
        for work in sends:
            work.wait()
        if self.eplb is not None:
            self.eplb.end_step()
        if not shard.is_last_stage:
            return None, [], None
        if len(logits) > 1:
            return torch.cat(logits), prompt_logits, None
        return (logits[0] if logits else None), prompt_logits, greedy_ids


def _split(counts: list[int], parts: int) -> list[int]:
    """Boundaries cutting the batch into at most `parts` contiguous runs of similar token totals."""
    parts = max(1, min(parts, len(counts)))
    total, bounds, acc = sum(counts), [0], 0
    for i, c in enumerate(counts):
        acc += c
        if len(bounds) < parts and acc >= total * len(bounds) / parts and i + 1 < len(counts):
            bounds.append(i + 1)
    bounds.append(len(counts))
    return bounds
