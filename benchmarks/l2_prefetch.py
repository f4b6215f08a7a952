#!/usr/bin/env python
"""Whether a batch-1 step could stream weights while its latency-bound kernels run: an L2 prefetch of the bytes a
later GEMV reads, issued before a chain of small dependent kernels (as a layer's norm, attention and router are),
against the same chain and read without it. GPU only (sm_90: `cp.async.bulk.prefetch.L2`).

The chain: CHAIN kernels, each one program following HOPS dependent loads through a 256 MB random cycle (each
load misses the caches, as the attention's page table, keys and values do). The read: a GEMV-shaped kernel over
S MB (rows of 2,048 bytes, 8 rows a program, a sum a row). Each row of the table is one CUDA graph, replayed
under triton.testing.do_bench (L2 flushed before each replay), median microseconds:
- chain: the chain alone; read: the read alone (and its bandwidth);
- chain+read: the chain, then the read (today's order: the read starts when the chain ends);
- prefetch+chain+read: a kernel issuing the read's bytes as bulk L2 prefetches (CHUNK bytes an instruction,
  asynchronous: the kernel ends at once), then the chain, then the read;
- prefetch+chain: what the prefetch traffic does to the chain's dependent loads.

    OUT=DIR python benchmarks/l2_prefetch.py [--sizes 8 16 25 33] [--chain 4] [--hops 3]
"""
import argparse
import json
import os

import torch
import triton
import triton.language as tl
from gpu_timing import graph_us

ROW = 2048
CHUNK = 64 << 10


@triton.jit
def _prefetch_l2(base, nbytes, sink_ptr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """One bulk L2 prefetch of CHUNK bytes a lane, over [base, base + nbytes)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    off = i.to(tl.int64) * CHUNK
    mask = off < nbytes
    size = tl.minimum(nbytes - off, CHUNK).to(tl.int32)
    addr = tl.where(mask, base + off, base)
    size = tl.where(mask, size, 16)
    done = tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2;\n\tmov.u32 $0, 0;", "=r,l,r",
                                     [addr, size], dtype=tl.int32, is_pure=False, pack=1)
    tl.store(sink_ptr + i, done, mask=done == 12345)  # never true: the asm's result is used


@triton.jit
def _chase(next_ptr, out_ptr, start, HOPS: tl.constexpr):
    """HOPS dependent loads (a pointer chase), the last index stored: one kernel of the latency-bound chain."""
    j = tl.load(out_ptr) + start
    for _ in tl.static_range(HOPS):
        j = tl.load(next_ptr + j)
    tl.store(out_ptr, j - start)


@triton.jit
def _read_rows(w_ptr, out_ptr, ROWS: tl.constexpr, ROW: tl.constexpr):
    """ROWS whole rows of bytes a program, summed (the access pattern of a GEMV at one token)."""
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    k = tl.arange(0, ROW)
    w = tl.load(w_ptr + r[:, None].to(tl.int64) * ROW + k[None, :])
    tl.store(out_ptr + r, tl.sum(w.to(tl.int32), axis=1))


def measure(mb: float, chain) -> dict:
    """One row of the table: the read of mb MB, each case's graph in microseconds."""
    dev = torch.device("cuda")
    nrows = int(mb * (1 << 20)) // ROW // 8 * 8
    w = torch.randint(-128, 127, (nrows, ROW), dtype=torch.int8, device=dev)
    out = torch.empty(nrows, dtype=torch.int32, device=dev)
    nbytes = w.numel()

    def read():
        _read_rows[(nrows // 8,)](w, out, ROWS=8, ROW=ROW, num_warps=4)

    def prefetch():
        lanes = triton.cdiv(nbytes, CHUNK)
        _prefetch_l2[(triton.cdiv(lanes, 128),)](w.data_ptr(), nbytes, out, CHUNK=CHUNK, BLOCK=128, num_warps=4)

    cases = {"chain": [chain], "read": [read], "chain+read": [chain, read],
             "prefetch+chain+read": [prefetch, chain, read], "prefetch+chain": [prefetch, chain],
             "prefetch+read": [prefetch, read]}
    row = {"MB": round(nbytes / 2**20, 1)}
    for name, fns in cases.items():
        def run(fns=fns):
            for f in fns:
                f()
        run()
        row[name] = round(graph_us([run]), 2)
    row["read_GBps"] = round(nbytes / row["read"] / 1e3, 0)
    row["saved_us"] = round(row["chain+read"] - row["prefetch+chain+read"], 2)
    print(row, flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=float, nargs="+", default=[8, 16, 25, 33], help="MB the read takes")
    ap.add_argument("--chain", type=int, default=4, help="kernels in the latency-bound chain")
    ap.add_argument("--hops", type=int, default=3, help="dependent loads a chain kernel")
    args = ap.parse_args()
    dev = torch.device("cuda")
    n = (256 << 20) // 8
    perm = torch.randperm(n, device=dev)
    cycle = torch.empty(n, dtype=torch.int64, device=dev)
    cycle[perm] = perm.roll(-1)  # one cycle through every slot, in random order
    pos = torch.zeros(1, dtype=torch.int64, device=dev)

    def chain():
        for c in range(args.chain):
            _chase[(1,)](cycle, pos, c * 7919, HOPS=args.hops, num_warps=1)

    rows = [measure(mb, chain) for mb in args.sizes]
    names = list(rows[0])
    print(" ".join(f"{k:>20}" for k in names))
    for r in rows:
        print(" ".join(f"{r[k]:>20}" for k in names))
    facts = {"device": torch.cuda.get_device_name(), "chain": args.chain, "hops": args.hops, "chunk": CHUNK,
             "rows": rows}
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "l2_prefetch.json"), "w") as f:
            json.dump(facts, f, indent=1)


if __name__ == "__main__":
    main()
