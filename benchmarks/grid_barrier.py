#!/usr/bin/env python
"""What one step of a layer-persistent kernel would cost against a kernel boundary: a grid-wide barrier inside a
kernel (an atomic counter, each program spinning until every program has arrived) against the next launch of a
CUDA graph (plain, and with programmatic dependent launch: the next kernel waiting in-kernel). Microseconds a
barrier or a boundary: (R rounds - 1 round) / (R - 1), each the median replay time of a graph of the launches.
GPU only (the programs must all be resident: the interpreter, one program after another, would spin forever).
`OUT=DIR python benchmarks/grid_barrier.py` writes DIR/grid_barrier.json."""
import json
import os

import torch
import triton
import triton.language as tl
from gpu_timing import graph_us

from param2moe.kernels.triton._common import release_dependents, wait_for_previous

ROUNDS = 33


@triton.jit
def _barriers(counter_ptr, out_ptr, ROUNDS: tl.constexpr):
    """ROUNDS grid-wide barriers; counter starts at 0 (a scalar atomic is one per program)."""
    n = tl.num_programs(0)
    for r in range(ROUNDS):
        tl.debug_barrier()
        tl.atomic_add(counter_ptr, 1, sem="release")
        target = (r + 1) * n
        seen = tl.atomic_add(counter_ptr, 0, sem="acquire")
        while seen < target:
            seen = tl.atomic_add(counter_ptr, 0, sem="acquire")
        tl.debug_barrier()
    tl.store(out_ptr + tl.program_id(0), tl.program_id(0))


@triton.jit
def _step(out_ptr, PDL: tl.constexpr):
    """One trivial step of a chain: waits for the kernel in front (PDL) and writes a word a program."""
    wait_for_previous(PDL)
    release_dependents(PDL)
    tl.store(out_ptr + tl.program_id(0), tl.program_id(0))


def launch_us(launch) -> float:
    """Microseconds a replay of a CUDA graph of `launch` (gpu_timing.graph_us)."""
    for _ in range(2):
        launch()
    return graph_us([launch])


def barrier_us(programs: int, warps: int) -> float:
    counter = torch.zeros(1, dtype=torch.int32, device="cuda")
    out = torch.empty(programs, dtype=torch.int32, device="cuda")

    def run(rounds):
        def launch():
            counter.zero_()
            _barriers[(programs,)](counter, out, ROUNDS=rounds, num_warps=warps)
        return launch_us(launch)
    one, many = run(1), run(ROUNDS)
    assert int(counter.item()) == ROUNDS * programs, f"counter {int(counter.item())} after {ROUNDS} rounds"
    return (many - one) / (ROUNDS - 1)


def boundary_us(programs: int, pdl: bool) -> float:
    out = torch.empty(programs, dtype=torch.int32, device="cuda")

    def run(steps):
        def launch():
            for _ in range(steps):
                _step[(programs,)](out, PDL=pdl, num_warps=4, **({"launch_pdl": True} if pdl else {}))
        return launch_us(launch)
    return (run(ROUNDS) - run(1)) / (ROUNDS - 1)


def main():
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for programs in (sms, 2 * sms, 4 * sms):
        for warps in (1, 4) if programs <= 2 * sms else (1,):  # every program resident (4 warps: 8 an SM)
            rows.append({"what": "grid barrier", "programs": programs, "warps": warps,
                         "us": round(barrier_us(programs, warps), 3)})
        for pdl in (False, True):
            rows.append({"what": "kernel boundary" + (" (PDL)" if pdl else ""), "programs": programs, "warps": 4,
                         "us": round(boundary_us(programs, pdl), 3)})
    print(f"{torch.cuda.get_device_name(0)}, {sms} SMs, triton {triton.__version__}")
    print(f"{'what':<24}{'programs':>9}{'warps':>6}{'us each':>9}")
    for r in rows:
        print(f"{r['what']:<24}{r['programs']:>9}{r['warps']:>6}{r['us']:>9.3f}")
    out = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    with open(os.path.join(out, "grid_barrier.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(0), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
