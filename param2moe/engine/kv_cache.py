"""The paged KV cache of this rank's layers, and the attention context of a step over it."""

from __future__ import annotations

import torch

from ..model.attention import PagedAttention


def kv_bytes_per_token(model) -> int:
    """Bytes of key and value cache one token takes on this rank (all its layers)."""
    layer = next(iter(model.model.layers.values())).attention
    elem = torch.empty((), dtype=model.dtype).element_size()
    return len(model.model.layers) * 2 * layer.num_kv_heads * layer.head_dim * elem


class KVCache:
    """Per layer [num_blocks + 1, block_size, kv_heads, head_dim] keys and values. The block manager hands out
    blocks 0..num_blocks-1; the last one is scratch: padding rows of a step write their keys and values there."""

    def __init__(self, model, num_blocks: int, block_size: int, device: torch.device):
        layer = next(iter(model.model.layers.values())).attention
        self.block_size, self.device = block_size, device
        self.scratch_slot = num_blocks * block_size
        self.layer_offset = model.model.layer_range.start  # first layer of this pipeline stage
        shape = (num_blocks + 1, block_size, layer.num_kv_heads, layer.head_dim)
        n = len(model.model.layers)
        # Not zeroed (seconds for gigabytes): attention never reads a slot before it is written.
        self.k_caches = [torch.empty(shape, dtype=model.dtype, device=device) for _ in range(n)]
        self.v_caches = [torch.empty(shape, dtype=model.dtype, device=device) for _ in range(n)]

    def attention(self, slot_mapping, block_tables, context_lens, query_start_loc, max_query_len: int,
                  max_context_len: int, ops) -> PagedAttention:
        """A step's attention over this cache (device tensors; the maxima as host ints); ops: the kernels."""
        return PagedAttention(self.k_caches, self.v_caches, slot_mapping, block_tables, context_lens, query_start_loc,
                              max_query_len=max_query_len, max_context_len=max_context_len,
                              layer_offset=self.layer_offset, ops=ops)
