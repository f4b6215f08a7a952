"""Batched LoRA, plain torch: each row of a batch adds the delta of its own adapter. The oracle of the
Triton version (triton/lora.py) and the CPU path.

Adapters sit in fixed slots of stacked tensors (param2moe/lora/slots.py), a module's in
    a [NB, S, R, in] and b [NB, S, out, R]
with NB buckets (an adapter's slot; for routed experts, slot * E + expert), S slices of the module's
output (gate and up of a fused gate/up projection are 2; others 1), R the slot rank (smaller ranks
zero-padded) and the adapter's scale already in b. Row m of a batch with bucket i_m >= 0 gets

    y[m, j*out:(j+1)*out] += (x[m] @ a[i_m, j].T) @ b[i_m, j].T     for every slice j,

rows with bucket -1 (the base model) nothing. The sum x @ a.T is taken in float32 and rounded to the
weights' dtype before the second product (as the kernels feed it to tensor cores); y's update is
rounded once. Decode-sized batches gather each row's A and B (batched products: a few ops whatever the
adapters); larger ones run a pair of matmuls per adapter over its rows.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class RowGroups(NamedTuple):
    """A batch's rows by adapter, read on the host: the rows with one (in bucket order) and their buckets,
    and the same as (bucket, rows) groups."""

    rows: torch.Tensor  # [m] int64
    buckets: torch.Tensor  # [m] int64
    groups: list[tuple[int, torch.Tensor]]


def rows_by_bucket(index: torch.Tensor) -> RowGroups:
    """The rows of index [M] (each row's bucket, -1: none) grouped by bucket."""
    index = index.long()
    buckets = [b for b in torch.unique(index).tolist() if b >= 0]
    groups = [(b, (index == b).nonzero().flatten()) for b in buckets]
    rows = torch.cat([r for _, r in groups]) if groups else index.new_zeros(0)
    return RowGroups(rows, index[rows], groups)


# Up to this many bytes of gathered weights, add_lora gathers each row's A and B and runs two batched
# products (a fixed handful of ops, decode steps); past it, one pair of matmuls per adapter (prefill).
_GATHER_BYTES = 32 << 20


def add_lora(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rows: RowGroups) -> torch.Tensor:
    """y += each row's LoRA delta (see the module doc), in place; returns y. rows: rows_by_bucket(index)."""
    m = rows.rows.numel()
    if m == 0:
        return y
    n_slices, rank, out = a.shape[1], a.shape[2], b.shape[2]
    cols = y[:, : n_slices * out]
    if m * n_slices * rank * (a.shape[3] + out) * 4 <= _GATHER_BYTES:
        xs = x.index_select(0, rows.rows).float()
        u = (a[rows.buckets].reshape(m, n_slices * rank, -1).float() @ xs[:, :, None]).to(a.dtype).float()
        delta = (b[rows.buckets].float() @ u.view(m, n_slices, rank, 1)).reshape(m, n_slices * out)
        cols.index_copy_(0, rows.rows, (cols.index_select(0, rows.rows).float() + delta).to(y.dtype))
        return y
    for bucket, r in rows.groups:
        xs = x.index_select(0, r).float()
        u = (xs @ a[bucket].reshape(n_slices * rank, -1).float().t()).to(a.dtype).float()
        u = u.view(-1, n_slices, rank)
        delta = torch.cat([u[:, j] @ b[bucket, j].float().t() for j in range(n_slices)], dim=1)
        cols.index_copy_(0, r, (cols.index_select(0, r).float() + delta).to(y.dtype))
    return y


class ExpertLoRA(NamedTuple):
    """LoRA on a MoE layer's routed experts: buckets slot * E + expert (E = the layer's experts)."""

    a13: torch.Tensor  # [slots * E, 2, R, H]: gate and up
    b13: torch.Tensor  # [slots * E, 2, I, R]
    a2: torch.Tensor  # [slots * E, 1, R, I]
    b2: torch.Tensor  # [slots * E, 1, H, R]
    token_slots: torch.Tensor  # [T] int32: each token's adapter slot, -1 for none


def pair_buckets(lora: ExpertLoRA, ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Each (token, k) pair's bucket [T*K] int32: its token's slot * E + its expert, -1 where either is none."""
    t, k = ids.shape
    slot = lora.token_slots.long()[:, None].expand(t, k).reshape(-1)  # (no host sync: CUDA graphs)
    flat = ids.reshape(-1).long()
    return torch.where((slot >= 0) & (flat >= 0), slot * num_experts + flat, -1).to(torch.int32)


def moe_experts_lora(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                     ids: torch.Tensor, lora: ExpertLoRA) -> torch.Tensor:
    """kernels.moe.moe_experts with each pair's expert adapted by its token's adapter: the delta of gate and
    up added before the activation, that of down after it; then the weighted sum over each token's pairs."""
    t, k = ids.shape
    flat = ids.reshape(-1)
    groups = rows_by_bucket(pair_buckets(lora, ids, w13.shape[0]))
    xs = x.repeat_interleave(k, dim=0)
    gate_up = x.new_zeros(t * k, w13.shape[1])
    for e in torch.unique(flat[flat >= 0]).tolist():
        rows = (flat == e).nonzero().flatten()
        gate_up[rows] = F.linear(xs[rows], w13[e])
    gate_up = add_lora(gate_up, xs, lora.a13, lora.b13, groups)
    g, u = gate_up.chunk(2, dim=-1)
    act = F.silu(g) * u
    out = x.new_zeros(t * k, w2.shape[1])
    for e in torch.unique(flat[flat >= 0]).tolist():
        rows = (flat == e).nonzero().flatten()
        out[rows] = F.linear(act[rows], w2[e])
    out = add_lora(out, act, lora.a2, lora.b2, groups)
    w = torch.where(flat >= 0, weights.reshape(-1).float(), 0.0)
    return (out.float() * w[:, None]).view(t, k, -1).sum(1).to(x.dtype)
