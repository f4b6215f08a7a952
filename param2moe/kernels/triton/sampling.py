"""Greedy token choice: the argmax of each row of the logits, in Triton. Oracle: `torch.argmax(logits, -1)`.

torch's argmax reduces a row in one block of threads: 36 us for one Param2 row (128,008 fp32 logits) on an
H100, 1.6% of a batch-1 decode step. Here each row is cut into chunks, one program each (max and the first
index holding it); the last program of a row to finish (an atomic counter per row, reset by it) picks the
best chunk. Ties go to the lowest index, as torch's; NaN counts as +inf.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 4096
_COUNTERS: dict = {}  # device -> int32 counters, one a row, zero between launches
_RETIRED: list = []  # counters replaced by larger ones: CUDA graphs captured earlier still use them


@triton.jit
def _argmax_kernel(x_ptr, part_v_ptr, part_i_ptr, counter_ptr, out_ptr, V, stride_x,
                   NCH: tl.constexpr, CHUNK: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    c = tl.program_id(1)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(x_ptr + row.to(tl.int64) * stride_x + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
    x = tl.where(x != x, float("inf"), x)
    m = tl.max(x, axis=0)
    # masked positions (-inf) come after every real one: they win only where the whole row is -inf
    i = tl.min(tl.where(x == m, offs, 2147483647), axis=0)
    tl.store(part_v_ptr + row * NCH + c, m)
    tl.store(part_i_ptr + row * NCH + c, i)
    tl.debug_barrier()  # the partials stored before the count below releases them
    done = tl.atomic_add(counter_ptr + row, 1, sem="acq_rel")
    if done == NCH - 1:
        j = tl.arange(0, BLOCK_C)
        pv = tl.load(part_v_ptr + row * NCH + j, mask=j < NCH, other=float("-inf"), cache_modifier=".cg")
        pi = tl.load(part_i_ptr + row * NCH + j, mask=j < NCH, other=2147483647, cache_modifier=".cg")
        best = tl.max(pv, axis=0)
        tl.store(out_ptr + row, tl.min(tl.where((pv == best) & (j < NCH), pi, 2147483647), axis=0).to(tl.int64))
        tl.atomic_xchg(counter_ptr + row, 0)


def argmax(logits: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Index of each row's largest logit [B] int64 (into out when given)."""
    b, v = logits.shape
    out = torch.empty(b, dtype=torch.int64, device=logits.device) if out is None else out
    if b == 0:
        return out
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    counters = _COUNTERS.get(logits.device)
    if counters is None or counters.numel() < b:  # grown outside graph capture: the engine warms up first
        if counters is not None:
            _RETIRED.append(counters)
        counters = _COUNTERS[logits.device] = torch.zeros(max(b, 64), dtype=torch.int32, device=logits.device)
    nch = triton.cdiv(v, CHUNK)
    part_v = torch.empty(b * nch, dtype=torch.float32, device=logits.device)
    part_i = torch.empty(b * nch, dtype=torch.int32, device=logits.device)
    _argmax_kernel[(b, nch)](logits, part_v, part_i, counters, out, v, logits.stride(0), NCH=nch, CHUNK=CHUNK,
                             BLOCK_C=triton.next_power_of_2(nch), num_warps=4)
    return out
