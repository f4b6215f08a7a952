"""Moving expert weights to their new slots, between ranks, in place.

Every rank derives the same list of moves from the old and the new placement (both [num_physical], the
logical expert in each slot), so senders and receivers agree without messages of their own. A slot whose
expert changes gets it from a slot of its own rank that held it, or else from the first slot that held it
(point-to-point, gloo on CPUs, NCCL on GPUs). All of a layer's reads (sends and local copies) finish before
any slot is written, then the new contents are copied into the existing storage: parameters are never
reallocated, so captured CUDA graphs stay valid.

What an expert is made of is generic: every tensor of the stacked expert weights whose leading dimension
is the slot (`expert_tensors`): w13 and w2, or the codes and scales of quantized stacks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


def expert_tensors(moe) -> list[torch.Tensor]:
    """The tensors that hold a MoE layer's experts, slot-major: [slots(, folded shared pieces), ...] each."""
    out = []
    for w in (moe.w13, moe.w2):
        if isinstance(w, torch.Tensor):
            out.append(w)
        else:  # a quantized stack (quant.QuantizedWeight): its codes, scales, ... stacked the same way
            lead = w.qweight.shape[0]
            out.extend(v for v in vars(w).values() if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == lead)
    return out


@dataclass
class Move:
    expert: int
    dst_rank: int
    dst_slots: list[int]  # physical slots on dst_rank that take the expert
    src_slot: int  # physical slot that holds it now (on rank src_slot // slots per rank)


def plan_moves(old: np.ndarray, new: np.ndarray, num_ranks: int) -> list[Move]:
    """The moves that turn placement `old` into `new` (slots whose expert is unchanged stay). A slot in old
    may be -1 (its contents not an expert yet: never a source)."""
    per_rank = len(new) // num_ranks
    holders: dict[int, list[int]] = {}
    for p, e in enumerate(old.tolist()):
        holders.setdefault(e, []).append(p)
    wanted: dict[tuple[int, int], list[int]] = {}
    for p, (o, e) in enumerate(zip(old.tolist(), new.tolist())):
        if o != e:
            wanted.setdefault((p // per_rank, e), []).append(p)
    moves = []
    for (rank, e), slots in wanted.items():
        held = holders.get(e)
        if not held:
            raise ValueError(f"expert {e} is in no slot of the old placement")
        here = [p for p in held if p // per_rank == rank]
        moves.append(Move(e, rank, slots, (here or held)[0]))
    return moves


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A byte view (point-to-point transfers of any dtype, fp8 included, through any backend)."""
    return t.reshape(-1).view(torch.uint8)


def move_experts(tensors: list[torch.Tensor], old: np.ndarray, new: np.ndarray, rank: int, num_ranks: int,
                 group=None) -> int:
    """Apply placement `new` to this rank's expert tensors (this is rank `rank` of `num_ranks` in `group`,
    whose slots are rank*per_rank ...). Collective over the group when experts cross ranks. Returns the number
    of slots this rank rewrote."""
    per_rank = len(new) // num_ranks
    lo = rank * per_rank
    staged, ops = [], []
    for mv in plan_moves(old, new, num_ranks):
        src_rank = mv.src_slot // per_rank
        if mv.dst_rank == rank:
            if src_rank == rank:
                bufs = [t[mv.src_slot - lo].clone() for t in tensors]
            else:
                bufs = [torch.empty_like(t[0]) for t in tensors]
                peer = _global(group, src_rank)
                ops += [dist.P2POp(dist.irecv, _bytes(b), peer, group) for b in bufs]
            staged.append((mv.dst_slots, bufs))
        elif src_rank == rank:
            peer = _global(group, mv.dst_rank)
            ops += [dist.P2POp(dist.isend, _bytes(t[mv.src_slot - lo]), peer, group) for t in tensors]
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    for slots, bufs in staged:  # every read is done: now overwrite
        for p in slots:
            for t, b in zip(tensors, bufs):
                t[p - lo].copy_(b)
    return sum(len(slots) for slots, _ in staged)


def _global(group, group_rank: int) -> int:
    return group_rank if group is None else dist.get_global_rank(group, group_rank)
