"""Process groups, rank layout, worker processes, and the driver's plan broadcast.

Ranks: world = tensor_parallel_size x pipeline_parallel_size. Global rank r sits on pipeline stage
P - 1 - r // TP with tensor-parallel rank r % TP: rank 0, the driver (scheduler, sampler, server),
is on the last stage, which holds the logits. NCCL carries tensors between GPUs and gloo between
CPU processes; the driver's step plans (small numpy arrays) always go over a gloo group.

Launch: one machine, `param2moe serve/generate --tensor-parallel-size N` starts the other ranks
itself (`LocalWorkers`) and watches them: a worker that dies takes the driver down with a
message. Several machines: start every process with torchrun (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT); rank 0 serves, the others run the worker loop (engine/worker.py).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import torch
import torch.distributed as dist

from ..model.shard import Shard
from .watch import start_peer_watch


class PlanComm:
    """The driver's step plans, broadcast to every rank over a gloo group."""

    def __init__(self, group):
        self.group = group

    def broadcast_plan(self, plan) -> None:
        dist.broadcast_object_list([plan], src=0, group=self.group)

    def receive_plan(self):
        box = [None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def all_min(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.long)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t)


def init_rank(rank: int, parallel, device_type: str) -> tuple[Shard, PlanComm, torch.device]:
    """Join the process group (MASTER_ADDR/MASTER_PORT from the environment) and build this rank's shard.
    parallel: the engine's ParallelConfig (tensor_parallel_size, pipeline_parallel_size, enable_expert_parallel,
    enable_eplb, num_redundant_experts)."""
    tp, pp, world = parallel.tensor_parallel_size, parallel.pipeline_parallel_size, parallel.world_size
    if device_type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", rank=rank, world_size=world,
                                device_id=device if device_type == "cuda" else None)
    if "RANK" in os.environ and world > 1:  # torchrun (several machines): the ranks watch each other
        start_peer_watch(rank, world)
    cpu_group = dist.new_group(backend="gloo") if device_type == "cuda" else dist.group.WORLD
    tp_group = None
    for block in range(pp):  # every rank creates every group, in the same order
        group = dist.new_group(list(range(block * tp, (block + 1) * tp)))
        if rank // tp == block:
            tp_group = group
    stage = pp - 1 - rank // tp
    shard = Shard(tp_rank=rank % tp, tp_size=tp, expert_parallel=parallel.enable_expert_parallel,
                  pp_rank=stage, pp_size=pp, tp_group=tp_group,
                  prev_stage_rank=rank + tp if stage > 0 else None,
                  next_stage_rank=rank - tp if stage < pp - 1 else None,
                  num_redundant_experts=parallel.num_redundant_experts if parallel.enable_eplb else 0)
    return shard, PlanComm(cpu_group), device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalWorkers:
    """Ranks 1..world_size-1 on this machine, started as `python -m MODULE RANK ARGS...`, and a thread that
    watches them: a worker that dies while the engine runs takes the driver down with a message (a
    collective would otherwise wait for it forever). The caller becomes rank 0.

    Workers are fresh interpreters, so the caller's script needs no `if __name__ == "__main__"` guard,
    as multiprocessing's spawn would; each exits when the driver's process is gone (`exit_with_parent`)."""

    def __init__(self, world_size: int, module: str, *args: str):
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(_free_port())  # fresh: an engine started after another must not reuse it
        self._stopping = threading.Event()  # set by stop(): workers exiting then is expected
        env = {**os.environ, PARENT_ENV: str(os.getpid())}
        self.procs = [subprocess.Popen([sys.executable, "-m", module, str(rank), *args],
                                       env={**env, "PARAM2MOE_WORKER_RANK": str(rank)})
                      for rank in range(1, world_size)]
        threading.Thread(target=self._watch, daemon=True, name="param2moe-worker-watch").start()

    def first_dead(self) -> tuple[int, int] | None:
        """(rank, exit code) of a worker that has exited, or None."""
        for rank, p in enumerate(self.procs, 1):
            if p.poll() is not None:
                return rank, p.returncode
        return None

    def stop_watching(self) -> None:
        self._stopping.set()

    def wait(self, timeout: float = 10.0) -> None:
        """Wait for every worker to exit (after the driver told them to stop); kill those that do not."""
        self._stopping.set()
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def kill(self) -> None:
        self._stopping.set()
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()

    def _watch(self) -> None:
        while not self._stopping.is_set():
            dead = self.first_dead()
            if dead is not None and dead[1] != 0 and not self._stopping.is_set():
                print(f"param2moe: worker rank {dead[0]} died (exit code {dead[1]}); shutting down",
                      file=sys.stderr, flush=True)
                for q in self.procs:
                    if q.poll() is None:
                        q.kill()
                os._exit(1)
            time.sleep(0.2)


PARENT_ENV = "PARAM2MOE_DRIVER_PID"


def exit_with_parent() -> None:
    """In a worker started by LocalWorkers: exit as soon as the driver's process is gone (killed, crashed),
    rather than wait in a collective for a peer that will never come."""
    parent = int(os.environ.get(PARENT_ENV, "0"))
    if not parent:
        return

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="param2moe-parent-watch").start()
