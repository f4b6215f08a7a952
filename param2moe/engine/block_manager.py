"""Paged KV-cache bookkeeping: fixed-size blocks, block tables, and prefix caching.

A full block is identified by its tokens and the chain of blocks before it (a hash of the previous
block's hash and its own token ids; the first block's chain starts from the sequence's adapter, so that
blocks are never shared across adapters). Full blocks stay findable after their sequence frees them,
until they are reused: free blocks are handed out least recently freed first (LRU eviction).
"""

from __future__ import annotations

from collections import OrderedDict

from .sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] | None = None


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # hash -> block id of a full block
        self.queries = self.hits = 0  # prefix-cache lookups and hits, in tokens

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free) / len(self.blocks)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    # -------------------------------------------------------------------- allocation
    def _take_free(self) -> Block:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:  # evict its prefix-cache entry: it is about to be overwritten
            if self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash = block.token_ids = None
        block.ref_count = 1
        return block

    def match_prefix(self, seq: Sequence) -> None:
        """On first scheduling: reuse cached blocks of the sequence's prefix (never its last token)."""
        if not self.enable_prefix_caching or seq.prompt_logprobs is not None:
            return  # prompt logprobs need every prompt position computed
        h = seq.cache_salt
        n_full = (seq.num_tokens - 1) // self.block_size
        self.queries += n_full * self.block_size
        for i in range(n_full):
            tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            h = hash((h, tokens))
            block_id = self.cached.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
            seq.block_hashes.append(h)
        hit = len(seq.block_table) * self.block_size
        self.hits += hit
        seq.num_computed_tokens = seq.num_cached_tokens = hit

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Give the sequence blocks for its next num_new_tokens; False (and nothing taken) if too few."""
        need = self.blocks_needed(seq, num_new_tokens)
        if need > len(self.free):
            return False
        for _ in range(need):
            seq.block_table.append(self._take_free().block_id)
        return True

    def commit_full_blocks(self, seq: Sequence) -> None:
        """After a step: make the blocks that are now completely computed findable by their prefix."""
        if not self.enable_prefix_caching:
            return
        n_full = seq.num_computed_tokens // self.block_size
        for i in range(len(seq.block_hashes), n_full):
            prev = seq.block_hashes[-1] if seq.block_hashes else seq.cache_salt
            tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            h = hash((prev, tokens))
            block = self.blocks[seq.block_table[i]]
            block.hash, block.token_ids = h, tokens
            self.cached.setdefault(h, block.block_id)
            seq.block_hashes.append(h)

    def free_seq(self, seq: Sequence) -> None:
        # Tail blocks first, so that shared prefixes are the last to be evicted.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0
