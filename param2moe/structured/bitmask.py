"""Applying a packed token bitmask to logits, in place.

The mask is xgrammar's layout: int32 words, bit j of word w for token 32 * w + j (1: allowed); disallowed
logits become -inf. On a GPU plain torch unpacks it (one shift over a [S, W, 32] view, then one masked
fill); on a CPU xgrammar's own C++ loop does the same about twice as fast.
"""

from __future__ import annotations

import torch


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """-inf into logits [S, V] wherever bitmask [S, ceil(V / 32)] has a 0 bit."""
    if logits.device.type == "cpu":
        import xgrammar

        xgrammar.apply_token_bitmask_inplace(logits, bitmask, backend="cpu")
    else:
        unpack_and_fill(logits, bitmask)


def unpack_and_fill(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    s, v = logits.shape
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    bits = ((bitmask.unsqueeze(-1) >> shifts) & 1).view(s, -1)[:, :v]
    logits.masked_fill_(bits == 0, float("-inf"))
