"""Runs one scheduled batch through the network: builds the flat inputs and the paged-attention
metadata, owns the KV cache, and returns the logits of the positions that are sampled (and of the
prompt positions whose logprobs were asked for)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..model.attention import PagedAttention
from .outputs import Logprob
from .scheduler import ScheduledBatch


def kv_bytes_per_token(model) -> int:
    """Bytes of key and value cache one token takes on this rank (all its layers)."""
    layer = next(iter(model.model.layers.values())).attention
    elem = torch.empty((), dtype=model.dtype).element_size()
    return len(model.model.layers) * 2 * layer.num_kv_heads * layer.head_dim * elem


@dataclass
class StepOutput:
    sample_logits: torch.Tensor  # [S, V] float32, one row per sampled sequence
    sampled_rows: list[int]  # which entries of the batch were sampled, in the order of the rows
    prompt_logprobs: dict[int, list[dict[int, Logprob]]]  # batch entry -> logprobs of new prompt positions


class ModelRunner:
    def __init__(self, model, num_blocks: int, block_size: int, device, max_model_len: int, decode_token=None):
        self.model, self.device, self.block_size = model, torch.device(device), block_size
        self.decode_token = decode_token
        model.init_rope(max(max_model_len, model.config.max_position_embeddings))
        layer = next(iter(model.model.layers.values())).attention
        # One block more than the block manager hands out: its slots take the writes of padding rows.
        self.scratch_slot = num_blocks * block_size
        shape = (num_blocks + 1, block_size, layer.num_kv_heads, layer.head_dim)
        n = len(model.model.layers)
        # Not zeroed (seconds for gigabytes): attention never reads a slot before it is written.
        self.k_caches = [torch.empty(shape, dtype=model.dtype, device=self.device) for _ in range(n)]
        self.v_caches = [torch.empty(shape, dtype=model.dtype, device=self.device) for _ in range(n)]
        self.layer_offset = model.model.layer_range.start
        self.graphs = None  # CudaGraphRunner, set by enable_cuda_graphs()

    def enable_cuda_graphs(self, max_batch_size: int, max_model_len: int) -> None:
        from .cuda_graphs import CudaGraphRunner

        self.graphs = CudaGraphRunner(self, max_batch_size, max_model_len)

    def prepare(self, batch: ScheduledBatch):
        """Host-side arrays of the batch (numpy), built without touching the device."""
        bs = self.block_size
        n_seqs, counts = len(batch), batch.num_new_tokens
        width = max(len(seq.block_table) for seq in batch.seqs)
        tables = np.zeros((n_seqs, width), dtype=np.int32)
        starts = np.empty(n_seqs, dtype=np.int64)
        ids: list[int] = []
        for b, seq in enumerate(batch.seqs):
            tables[b, : len(seq.block_table)] = seq.block_table
            s = starts[b] = seq.num_computed_tokens
            ids.extend(seq.token_ids[s:s + counts[b]])
        n = np.asarray(counts, dtype=np.int64)
        q_start = np.zeros(n_seqs + 1, dtype=np.int64)
        np.cumsum(n, out=q_start[1:])
        seq_index = np.repeat(np.arange(n_seqs), n)
        positions = np.arange(q_start[-1]) - np.repeat(q_start[:-1], n) + np.repeat(starts, n)
        slots = tables[seq_index, positions // bs].astype(np.int64) * bs + positions % bs
        return dict(input_ids=np.asarray(ids, dtype=np.int64), positions=positions, slot_mapping=slots,
                    block_tables=tables, context_lens=(starts + n).astype(np.int32), query_start_loc=q_start)

    def _attention(self, host: dict) -> PagedAttention:
        dev = self.device
        t = {k: torch.from_numpy(v).to(dev, non_blocking=True) for k, v in host.items()}
        return PagedAttention(
            self.k_caches, self.v_caches, slot_mapping=t["slot_mapping"], block_tables=t["block_tables"],
            context_lens=t["context_lens"], query_start_loc=t["query_start_loc"],
            max_query_len=int(np.diff(host["query_start_loc"]).max()), max_context_len=int(host["context_lens"].max()),
            layer_offset=self.layer_offset), t["input_ids"], t["positions"]

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> StepOutput:
        host = self.prepare(batch)
        q_start = host["query_start_loc"].tolist()
        sampled_rows, rows = [], []
        for b, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            if seq.num_computed_tokens + n == seq.num_tokens:  # reaches the end: sample the next token
                sampled_rows.append(b)
                rows.append(q_start[b + 1] - 1)
        needs_prompt_lps = any(seq.needs_prompt_logprobs for seq in batch.seqs)
        if self.graphs is not None and not needs_prompt_lps and self.graphs.can_run(host):
            return StepOutput(self.graphs.run(host), sampled_rows, {})
        attn, input_ids, positions = self._attention(host)
        hidden = self.model(input_ids, positions, attn)
        logits = self.model.compute_logits(hidden[rows]) if rows else None
        prompt_lps = {}
        for b, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            if seq.needs_prompt_logprobs:
                prompt_lps[b] = self._prompt_logprobs(seq, n, hidden[q_start[b]:q_start[b + 1]])
        return StepOutput(logits, sampled_rows, prompt_lps)

    def _prompt_logprobs(self, seq, n: int, hidden: torch.Tensor) -> list[dict[int, Logprob]]:
        """Logprob of each next prompt token at the chunk's positions (and the top-N beside it)."""
        s = seq.num_computed_tokens
        first = len(seq.prompt_logprobs) - 1  # position whose next token has no logprob yet
        last = min(s + n, seq.num_prompt_tokens - 1)  # positions < last predict a prompt token
        if last <= first:
            return []
        h = hidden[first - s:last - s]
        lp = self.model.compute_logits(h).log_softmax(-1)
        targets = torch.tensor(seq.token_ids[first + 1:last + 1], device=lp.device)
        chosen = lp.gather(1, targets[:, None])[:, 0]
        ranks = ((lp > chosen[:, None]).sum(-1) + 1).tolist()
        k = seq.params.prompt_logprobs
        top_v, top_i = lp.topk(max(k, 1), dim=-1)
        out = []
        for j, (t, c) in enumerate(zip(targets.tolist(), chosen.tolist())):
            entry = {t: self._logprob(c, ranks[j], t)}
            for r in range(k):
                tid = int(top_i[j, r])
                entry.setdefault(tid, self._logprob(float(top_v[j, r]), r + 1, tid))
            out.append(entry)
        return out

    def _logprob(self, value: float, rank: int, token_id: int) -> Logprob:
        return Logprob(value, rank, self.decode_token(token_id) if self.decode_token else None)
