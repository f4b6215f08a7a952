"""A step's token inputs in plain torch (the oracle of `triton/embedding.py`, and the CPU path)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resolve_ids(input_ids: torch.Tensor, prev=None) -> torch.Tensor:
    """input_ids with the rows that wait for the previous step's tokens (prev = (prev_index, prev_tokens),
    prev_index >= 0) read from that step's sampled ids, still on the device."""
    if prev is None:
        return input_ids
    prev_index, prev_tokens = prev
    return torch.where(prev_index >= 0, prev_tokens[prev_index.clamp(min=0).long()], input_ids.long())


def token_inputs(embedding: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor, input_ids: torch.Tensor,
                 positions: torch.Tensor, prev=None):
    """(embedding rows, RoPE cos rows, RoPE sin rows) of the tokens at their positions."""
    positions = positions.long()
    return F.embedding(resolve_ids(input_ids, prev), embedding), cos_table[positions], sin_table[positions]
