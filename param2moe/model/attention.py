"""How a forward pass's tokens group into sequences, and where their keys and values live.

The network hands each layer's projections to `attend(layer, q, k, v, scale, norm_rope)`: q and k as
projected, with what turns them into attention's inputs (QK-norm weights, RoPE cos/sin at the tokens'
positions, eps), so that the attention can fuse that work and the KV-cache write into its own launches.
It never needs to know which of these it has:
- `CausalAttention`: independent sequences with no cache (the reference forward, and tests);
- `PagedAttention`: the engine's batch over a paged KV cache (see engine/kv_cache.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels import AUTO, Kernels


class CausalAttention:
    def __init__(self, seq_lens: list[int], ops: Kernels = AUTO):
        self.ops = ops
        self.cu_seqlens = [0]
        for n in seq_lens:
            self.cu_seqlens.append(self.cu_seqlens[-1] + n)

    def attend(self, layer: int, q, k, v, scale: float, norm_rope) -> torch.Tensor:
        q, k = self.ops.qk_norm_rope(q, k, *norm_rope)
        return self.ops.causal_attention(q, k, v, self.cu_seqlens, scale)


@dataclass
class PagedAttention:
    """One step's batch: B sequences, their new tokens packed at query_start_loc."""

    k_caches: list[torch.Tensor]  # per layer [num_blocks, block_size, kv_heads, D]
    v_caches: list[torch.Tensor]
    slot_mapping: torch.Tensor  # [T] where each new token's k and v go
    block_tables: torch.Tensor  # [B, max_blocks]
    context_lens: torch.Tensor  # [B] cached tokens after this step's are written
    query_start_loc: torch.Tensor  # [B + 1]
    max_query_len: int  # host-side maxima, so kernels need no device-to-host read
    max_context_len: int
    layer_offset: int = 0  # first layer of this pipeline stage (caches are indexed from it)
    ops: Kernels = AUTO  # the engine's kernel backend

    def decode_cache(self, layer: int):
        """(k_cache, v_cache, block_tables, context_lens, slot_mapping) of the layer when this step is a decode
        (one new token per sequence: the fused CPU decode layer takes it), else None."""
        if self.max_query_len != 1 or self.block_tables.shape[0] != self.slot_mapping.shape[0]:
            return None
        i = layer - self.layer_offset
        return self.k_caches[i], self.v_caches[i], self.block_tables, self.context_lens, self.slot_mapping

    def attend(self, layer: int, q, k, v, scale: float, norm_rope) -> torch.Tensor:
        """norm_rope = (q_weight, k_weight, cos, sin, eps) as Kernels.qk_norm_rope takes them; the new k and v
        are stored at slot_mapping before any query reads the cache."""
        i = layer - self.layer_offset
        return self.ops.paged_attention(q, self.k_caches[i], self.v_caches[i], self.block_tables, self.context_lens,
                                   self.query_start_loc, scale, self.max_query_len, self.max_context_len,
                                   new_kv=(k, v, self.slot_mapping, *norm_rope))
