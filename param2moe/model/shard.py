"""Which part of the model this process holds, and the collectives that join the parts.

Tensor parallel (TP) ranks split attention heads, MLP widths and the vocabulary; with expert
parallelism (EP) the same ranks split the routed experts instead of their width; pipeline stages
(PP) split the layers into contiguous runs. One process: every method is a no-op.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Shard:
    tp_rank: int = 0
    tp_size: int = 1
    expert_parallel: bool = False
    pp_rank: int = 0
    pp_size: int = 1
    tp_group: object = None  # a torch.distributed process group when tp_size > 1
    prev_stage_rank: int | None = None  # global rank this rank receives hidden states from (pipeline)
    next_stage_rank: int | None = None  # global rank it sends them to
    num_redundant_experts: int = 0  # expert load balancing: physical expert slots beyond the logical experts

    @property
    def ep_size(self) -> int:
        return self.tp_size if self.expert_parallel else 1

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    # ------------------------------------------------------------------ what this rank holds
    def local_kv_heads(self, num_kv_heads: int) -> int:
        """KV heads split evenly, or replicated (one per rank) when there are fewer than ranks."""
        return max(1, num_kv_heads // self.tp_size)

    def kv_head_start(self, num_kv_heads: int) -> int:
        if num_kv_heads >= self.tp_size:
            return self.tp_rank * (num_kv_heads // self.tp_size)
        return self.tp_rank * num_kv_heads // self.tp_size

    def local_experts(self, num_experts: int) -> tuple[int, int]:
        """The physical expert slots [start, end) this rank holds: num_experts + num_redundant_experts slots split
        evenly over the expert-parallel ranks (which logical expert each slot holds: param2moe/eplb)."""
        n = (num_experts + self.num_redundant_experts) // self.ep_size
        rank = self.tp_rank if self.ep_size > 1 else 0
        return rank * n, (rank + 1) * n

    def local_expert_width(self, width: int) -> int:
        return width if self.expert_parallel else width // self.tp_size

    def local_vocab(self, vocab_size: int) -> tuple[int, int]:
        per_rank = -(-vocab_size // self.tp_size)
        start = self.tp_rank * per_rank
        return start, min(vocab_size, start + per_rank)

    def local_layers(self, num_layers: int) -> tuple[int, int]:
        """Contiguous layers of this pipeline stage; earlier stages take the remainder."""
        base, extra = divmod(num_layers, self.pp_size)
        start = self.pp_rank * base + min(self.pp_rank, extra)
        return start, start + base + (1 if self.pp_rank < extra else 0)

    # ------------------------------------------------------------------ collectives
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size > 1:
            torch.distributed.all_reduce(x, group=self.tp_group)
        return x

    def broadcast_from_driver(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's tensor on every rank of the (single-stage) tensor-parallel group, in stream order."""
        if self.tp_size > 1:
            torch.distributed.broadcast(x, src=0, group=self.tp_group)
        return x

    def all_gather_vocab(self, logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """[N, local vocab] on each rank -> [N, vocab_size] on every rank."""
        if self.tp_size == 1:
            return logits
        per_rank = -(-vocab_size // self.tp_size)
        padded = torch.zeros(logits.shape[0], per_rank, dtype=logits.dtype, device=logits.device)
        padded[:, : logits.shape[1]] = logits
        parts = [torch.empty_like(padded) for _ in range(self.tp_size)]
        torch.distributed.all_gather(parts, padded, group=self.tp_group)
        return torch.cat(parts, dim=1)[:, :vocab_size]

    # ------------------------------------------------------------------ pipeline hand-over
    def send_to_next_stage(self, hidden: torch.Tensor, residual: torch.Tensor) -> list:
        """Start sending a micro-batch's hidden state and residual; returns the works to wait on."""
        return [torch.distributed.isend(hidden.contiguous(), self.next_stage_rank),
                torch.distributed.isend(residual.contiguous(), self.next_stage_rank)]

    def recv_from_prev_stage(self, num_tokens: int, hidden_size: int, dtype, device):
        hidden = torch.empty(num_tokens, hidden_size, dtype=dtype, device=device)
        residual = torch.empty_like(hidden)
        torch.distributed.recv(hidden, self.prev_stage_rank)
        torch.distributed.recv(residual, self.prev_stage_rank)
        return hidden, residual
