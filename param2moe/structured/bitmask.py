"""Applying a packed token bitmask to logits (plain torch, any device).

The mask is xgrammar's layout: int32 words, bit j of word w for token 32 * w + j (1: allowed). Unpacked
with one shift over a [S, W, 32] view; disallowed logits become -inf before any sampling option.
"""

from __future__ import annotations

import torch


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """A copy of logits [S, V] with -inf where bitmask [S, ceil(V / 32)] has a 0 bit."""
    s, v = logits.shape
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    bits = ((bitmask.unsqueeze(-1) >> shifts) & 1).view(s, -1)[:, :v]
    return logits.masked_fill(bits == 0, float("-inf"))
