"""How the GPU benchmarks time kernels: the calls captured in one CUDA graph (no launch gaps between them; several
calls with different inputs a graph so that neither the gaps nor L2 reuse flatter decode-size launches), the
graph replayed under triton.testing.do_bench (median; it flushes the L2 before each replay)."""

from __future__ import annotations

import torch
import triton


def graph_us(fns, rep: int = 50) -> float:
    """Microseconds a call of fns (callables, each run once before: compiled, allocations made), captured in
    one CUDA graph and replayed."""
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    ms = triton.testing.do_bench(graph.replay, warmup=5, rep=rep, return_mode="median")
    del graph
    return ms * 1e3 / len(fns)
