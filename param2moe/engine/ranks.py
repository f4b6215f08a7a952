"""The driver's side of a parallel engine: start the other ranks (or join those torchrun started), and stop
them again: when the engine shuts down, is garbage-collected, or the interpreter exits."""

from __future__ import annotations

import gc
import os
import time

import torch.distributed as dist

from ..distributed import LocalWorkers, RankLostError, init_rank, stop_peer_watch


class DriverRanks:
    """Rank 0's process group, its plan channel (comm) and, on one machine, the worker processes."""

    def __init__(self, config, parallel):
        _check_no_live_group()
        self.workers = None
        if "RANK" not in os.environ:  # one machine: start the other ranks here; torchrun starts its own
            self.workers = LocalWorkers(parallel.world_size, "param2moe.engine", config.to_json())
        self.runner = None  # set once built: its CUDA graphs go before the process group
        self.stopped = False
        try:
            device_type = "cuda" if str(config.device).startswith("cuda") else "cpu"
            self.shard, self.comm, self.device = init_rank(0, parallel, device_type)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Tell the other ranks to stop, wait for the local ones, leave the process group. Once."""
        if self.stopped:
            return
        self.stopped = True
        stop_peer_watch()
        if self.workers is not None:
            self.workers.stop_watching()
        if self.runner is None:  # the ranks may be anywhere in their start-up: no plan can reach them
            if self.workers is not None:
                self.workers.kill()
        else:
            self.comm.broadcast_plan(None)
            # NCCL cannot tear down a communicator whose collectives live on in captured graphs
            self.runner.release_cuda_graphs()
            if self.workers is not None:
                self.workers.wait()
        if dist.is_initialized():
            dist.destroy_process_group()

    def raise_if_a_worker_died(self, error: Exception) -> None:
        """A collective that fails because a peer is gone: say which worker died, not gloo's words."""
        if self.workers is None:  # torchrun: the other ranks are on other machines (their watch: distributed/watch.py)
            raise RankLostError(f"a collective with the other ranks failed (a node or its process died?): {error}"
                                ) from error
        deadline = time.monotonic() + 2.0
        while self.workers is not None and time.monotonic() < deadline:
            dead = self.workers.first_dead()
            if dead is not None:
                raise RuntimeError(f"worker rank {dead[0]} died (exit code {dead[1]}); the engine cannot go on"
                                   ) from error
            time.sleep(0.05)


def _check_no_live_group() -> None:
    """One parallel engine a process at a time (the default process group is the process's): an engine that
    was dropped but not yet collected gives its group back now; a live one is an error, never a hang."""
    if not dist.is_initialized() or "RANK" in os.environ:
        return
    gc.collect()
    if dist.is_initialized():
        raise RuntimeError("another parallel engine (or a torch.distributed process group) is live in this "
                           "process; call shutdown() on that LLM first (one parallel engine at a time)")

