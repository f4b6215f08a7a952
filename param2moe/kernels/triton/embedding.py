"""A step's token inputs in one launch: the input ids (those still on the device as the previous step's
sampled ids taken from there), their embedding rows, and the RoPE cos/sin rows of their positions.
Oracle: `param2moe.kernels.embedding.token_inputs`.

Done with torch ops this is about 15 small kernels (index arithmetic, dtype conversions, gathers): 32 us
before the first layer of a batch-1 decode step on an H100.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _token_inputs_kernel(ids_ptr, prev_index_ptr, prev_tokens_ptr, pos_ptr, emb_ptr, cos_t_ptr, sin_t_ptr,
                         h_ptr, cos_ptr, sin_ptr, H, HALF, stride_e, stride_ct, stride_h, stride_c,
                         HAS_PREV: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr):
    t = tl.program_id(0)
    tok = tl.load(ids_ptr + t).to(tl.int64)
    if HAS_PREV:
        p = tl.load(prev_index_ptr + t).to(tl.int64)
        tok = tl.where(p >= 0, tl.load(prev_tokens_ptr + tl.maximum(p, 0)).to(tl.int64), tok)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    r = tl.arange(0, BLOCK_R)
    rm = r < HALF
    tl.store(cos_ptr + t * stride_c + r, tl.load(cos_t_ptr + pos * stride_ct + r, mask=rm), mask=rm)
    tl.store(sin_ptr + t * stride_c + r, tl.load(sin_t_ptr + pos * stride_ct + r, mask=rm), mask=rm)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        hm = cols < H
        tl.store(h_ptr + t * stride_h + cols, tl.load(emb_ptr + tok * stride_e + cols, mask=hm), mask=hm)


def token_inputs(embedding: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor, input_ids: torch.Tensor,
                 positions: torch.Tensor, prev=None):
    """(embedding rows [T, H], cos [T, R], sin [T, R]) of the tokens; prev = (prev_index, prev_tokens): rows
    with prev_index >= 0 take their id from prev_tokens[prev_index]."""
    t, (_, hidden), half = input_ids.shape[0], embedding.shape, cos_table.shape[1]
    dev = embedding.device
    h = torch.empty(t, hidden, dtype=embedding.dtype, device=dev)
    cos = torch.empty(t, half, dtype=cos_table.dtype, device=dev)
    sin = torch.empty(t, half, dtype=sin_table.dtype, device=dev)
    if t == 0:
        return h, cos, sin
    assert embedding.stride(-1) == 1 and cos_table.stride() == sin_table.stride() and cos_table.stride(-1) == 1
    prev_index, prev_tokens = prev if prev is not None else (input_ids, input_ids)
    _token_inputs_kernel[(t,)](
        input_ids, prev_index, prev_tokens, positions, embedding, cos_table, sin_table, h, cos, sin, hidden, half,
        embedding.stride(0), cos_table.stride(0), h.stride(0), cos.stride(0), HAS_PREV=prev is not None,
        BLOCK_H=min(4096, triton.next_power_of_2(hidden)), BLOCK_R=triton.next_power_of_2(half), num_warps=4)
    return h, cos, sin
