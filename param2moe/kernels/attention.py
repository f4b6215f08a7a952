"""Attention, plain torch: causal attention over variable-length sequences, and attention through a
paged KV cache (the engine's layout). The oracles of the Triton paged-attention kernels.

Paged layout: k_cache, v_cache [num_blocks, block_size, kv_heads, D]; a sequence's token j lives in
block block_table[j // block_size] at offset j % block_size ("slot" = block * block_size + offset).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: list[int],
                     scale: float) -> torch.Tensor:
    """q [T, NH, D], k/v [T, NKV, D]; sequences packed back to back at offsets cu_seqlens."""
    out = torch.empty_like(q)
    for s, e in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        o = F.scaled_dot_product_attention(
            q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1),
            is_causal=True, scale=scale, enable_gqa=True)
        out[s:e] = o.transpose(0, 1)
    return out


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Store the new tokens' k and v [T, NKV, D] at their slots. (Padding rows of a batch point at a
    scratch slot the engine never hands out, so every row is written and shapes stay fixed.)"""
    slot_mapping = slot_mapping.long()  # (int32 in the CUDA graphs' buffers)
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, context_lens: torch.Tensor,
                    query_start_loc: torch.Tensor, scale: float, max_query_len: int,
                    max_context_len: int) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its whole cached context.

    q: [T, NH, D], the new tokens of B sequences packed at query_start_loc [B+1];
    context_lens [B]: tokens in the cache for each sequence, the new ones included (a query's
    position is context_len - query_len + i); block_tables [B, max_blocks] (-1 past the end);
    max_query_len / max_context_len: the largest of each, as host ints.
    The sequences are padded into one batch so that a step makes one attention call, not B (on the
    CPU, two when it mixes decodes with longer chunks: padding single queries to a prompt chunk's
    length would multiply their work).
    """
    nkv, d = k_cache.shape[2:]
    nh = q.shape[1]
    g = nh // nkv  # query heads per KV head
    out = None
    for grp in _batch_layout(block_tables, context_lens, query_start_loc, k_cache.shape[1], g, max_query_len,
                             max_context_len, q.dtype):
        b, max_q, max_ctx = grp.b, grp.max_q, grp.max_ctx
        if grp.blocks is not None:  # whole blocks, then the positions past each context zeroed
            k = k_cache.view(k_cache.shape[0], -1).index_select(0, grp.blocks).view(b, max_ctx, nkv, d)
            v = v_cache.view(v_cache.shape[0], -1).index_select(0, grp.blocks).view(b, max_ctx, nkv, d)
            if grp.slots.numel():
                k.view(-1, nkv, d).index_fill_(0, grp.slots, 0)
                v.view(-1, nkv, d).index_fill_(0, grp.slots, 0)
        else:
            k = k_cache.view(-1, nkv, d).index_select(0, grp.slots).view(b, max_ctx, nkv, d)
            v = v_cache.view(-1, nkv, d).index_select(0, grp.slots).view(b, max_ctx, nkv, d)
        # Each KV head's g query heads are folded into the query length (GQA without repeating keys
        # and values): [B, NKV, g * max_q, D], row r = head r // max_q, query r % max_q.
        qp = q.index_select(0, grp.rows).view(b, max_q, nkv, g, d).permute(0, 2, 3, 1, 4).reshape(b, nkv, -1, d)
        o = F.scaled_dot_product_attention(qp, k.transpose(1, 2), v.transpose(1, 2), attn_mask=grp.mask,
                                           scale=scale)
        o = o.view(b, nkv, g, max_q, d).permute(0, 3, 1, 2, 4).reshape(b * max_q, nh, d)
        if grp.valid is not None:
            o = o.index_select(0, grp.valid)  # drop the padding queries
        if grp.tokens is None:  # the whole batch, in order
            return o
        out = q.new_empty(q.shape) if out is None else out
        out.index_copy_(0, grp.tokens, o)
    return out


@dataclass
class _Group:
    """Sequences attended in one call, padded to max_q queries and max_ctx keys."""

    b: int
    max_q: int
    max_ctx: int
    slots: torch.Tensor  # [b * max_ctx] cache slots to gather
    rows: torch.Tensor  # [b * max_q] rows of q to gather
    valid: torch.Tensor | None  # rows of the padded output that are real queries (None: all)
    tokens: torch.Tensor | None  # where those go in the output (None: the whole batch, in order)
    mask: torch.Tensor  # [b, 1, g * max_q, max_ctx], additive
    blocks: torch.Tensor | None = None  # [b * max_ctx / block_size] cache blocks to gather whole, instead of
    # slots (CPU decodes); slots then lists the gathered positions past each context, to be zeroed


# Every layer of a step attends over the same batch layout: on the CPU, the last one is kept and reused
# while the same metadata tensors come in (held here, so their ids stay theirs). Not on CUDA, where a
# captured graph must record the work itself.
_last_layout: list = [None]


def _batch_layout(block_tables, context_lens, query_start_loc, block_size: int, g: int, max_q: int,
                  max_ctx: int, dtype) -> list[_Group]:
    key = (block_tables, context_lens, query_start_loc, block_size, g, max_q, max_ctx, dtype)
    last = _last_layout[0]
    if last is not None and all(x is y for x, y in zip(last[0][:3], key[:3])) and last[0][3:] == key[3:]:
        return last[1]
    starts, q_lens = query_start_loc[:-1], query_start_loc[1:] - query_start_loc[:-1]
    on_cpu = block_tables.device.type == "cpu"
    groups = None
    if on_cpu and max_q > 1:  # host reads are free here: split off the decodes
        lens = q_lens.tolist()
        decodes = [i for i, n in enumerate(lens) if n == 1]
        if 0 < len(decodes) < len(lens):
            ctx = context_lens.tolist()
            groups = []
            for idx in (decodes, [i for i, n in enumerate(lens) if n > 1]):
                sel = torch.tensor(idx, device=block_tables.device)
                groups.append(_group(block_tables[sel], context_lens[sel], starts[sel], q_lens[sel], block_size, g,
                                     max(lens[i] for i in idx), max(ctx[i] for i in idx), dtype, split=True))
    if groups is None:
        groups = [_group(block_tables, context_lens, starts, q_lens, block_size, g, max_q, max_ctx, dtype)]
    _last_layout[0] = (key, groups) if on_cpu else None
    return groups


def _group(block_tables, context_lens, starts, q_lens, block_size: int, g: int, max_q: int, max_ctx: int, dtype,
           split: bool = False) -> _Group:
    dev, b = block_tables.device, block_tables.shape[0]
    if max_q == 1 and dev.type == "cpu":
        return _decode_group(block_tables, context_lens, starts, block_size, g, max_ctx, dtype, split)
    # Slots past a sequence's context hold stale or never-written values (NaN even, in a cache from
    # torch.empty), which the mask drops but a NaN would still poison the softmax: padding positions
    # read the sequence's last position instead. (Gathered with index_select: a plain row gather,
    # several times faster on the CPU than advanced indexing.)
    j = torch.arange(max_ctx, device=dev)
    pos = torch.minimum(j[None, :], (context_lens.long() - 1).clamp(min=0)[:, None])  # [b, max_ctx]
    slots = (block_tables.long().gather(1, pos // block_size) * block_size + pos % block_size).view(-1)
    # Queries padded to max_q: padding rows repeat the sequence's last query and are dropped at the end.
    i = torch.arange(max_q, device=dev)
    rows = (starts[:, None] + torch.minimum(i[None, :], (q_lens - 1)[:, None])).view(-1)
    valid = tokens = None
    if max_q > 1:
        valid = (i[None, :] < q_lens[:, None]).view(-1).nonzero()[:, 0]
    if split:
        tokens = rows if valid is None else rows.index_select(0, valid)
    # Causal within the context: query i of a sequence sits at position context_len - q_len + i.
    q_pos = (context_lens - q_lens)[:, None] + i[None, :]
    allowed = (j[None, None, :] <= q_pos[:, :, None]) & (j[None, None, :] < context_lens[:, None, None])
    mask = torch.zeros(allowed.shape, dtype=dtype, device=dev).masked_fill_(~allowed, float("-inf"))
    mask = mask[:, None].expand(b, g, max_q, max_ctx).reshape(b, 1, g * max_q, max_ctx)
    return _Group(b, max_q, max_ctx, slots, rows, valid, tokens, mask)


def _decode_group(block_tables, context_lens, starts, block_size: int, g: int, max_ctx: int, dtype,
                  split: bool) -> _Group:
    """Single queries on the CPU: each sequence's first ceil(max_ctx / block_size) blocks gathered whole
    (one row copy per block instead of one per token: 10-15% less time in the gather, which moves most
    of a decode step's attention bytes). Positions past a context read stale or never-written slots, or
    block 0 where the table ends: they are zeroed after the gather (a NaN there would poison the
    softmax and the weighted sum even though the mask drops it)."""
    dev, b = block_tables.device, block_tables.shape[0]
    n_blocks = -(-max_ctx // block_size)
    padded_ctx = n_blocks * block_size
    blocks = block_tables[:, :n_blocks].long().clamp(min=0).reshape(-1)
    j = torch.arange(padded_ctx, device=dev)
    past = j[None, :] >= context_lens.long()[:, None]  # [b, padded_ctx]
    zero = past.view(-1).nonzero()[:, 0]
    mask = torch.zeros(past.shape, dtype=dtype, device=dev).masked_fill_(past, float("-inf"))
    mask = mask[:, None, None, :].expand(b, 1, g, padded_ctx)
    rows = starts.long()
    return _Group(b, 1, padded_ctx, zero, rows, None, rows if split else None, mask, blocks)
