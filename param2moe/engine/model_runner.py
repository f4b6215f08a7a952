"""Runs one scheduled batch through the network: builds the flat inputs and the paged-attention
metadata, owns the KV cache, and returns the logits of the positions that are sampled (and of the
prompt positions whose logprobs were asked for)."""

from __future__ import annotations

from dataclasses import dataclass

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

    def prepare(self, batch: ScheduledBatch):
        bs = self.block_size
        ids, positions, seq_index, q_start, ctx_lens = [], [], [], [0], []
        for b, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            s = seq.num_computed_tokens
            ids.extend(seq.token_ids[s:s + n])
            positions.extend(range(s, s + n))
            seq_index.extend([b] * n)
            q_start.append(q_start[-1] + n)
            ctx_lens.append(s + n)
        width = max(len(seq.block_table) for seq in batch.seqs)
        tables = torch.full((len(batch), width), -1, dtype=torch.int32)
        for b, seq in enumerate(batch.seqs):
            tables[b, : len(seq.block_table)] = torch.tensor(seq.block_table, dtype=torch.int32)
        pos = torch.tensor(positions, dtype=torch.long)
        slots = tables[torch.tensor(seq_index), pos // bs].long() * bs + pos % bs
        dev = self.device
        attn = PagedAttention(
            self.k_caches, self.v_caches, slot_mapping=slots.to(dev), block_tables=tables.to(dev).long(),
            context_lens=torch.tensor(ctx_lens, device=dev), query_start_loc=torch.tensor(q_start, device=dev),
            max_query_len=max(batch.num_new_tokens), max_context_len=max(ctx_lens), layer_offset=self.layer_offset)
        return torch.tensor(ids, device=dev), pos.to(dev), attn, q_start

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> StepOutput:
        input_ids, positions, attn, q_start = self.prepare(batch)
        hidden = self.model(input_ids, positions, attn)
        sampled_rows, rows = [], []
        for b, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            if seq.num_computed_tokens + n == seq.num_tokens:  # reaches the end: sample the next token
                sampled_rows.append(b)
                rows.append(q_start[b + 1] - 1)
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
