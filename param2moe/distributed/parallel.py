"""Process groups, rank layout, worker processes, and the driver's plan broadcast.

Ranks: world = tensor_parallel_size x pipeline_parallel_size. Global rank r sits on pipeline stage
P - 1 - r // TP with tensor-parallel rank r % TP: rank 0, the driver (scheduler, sampler, server),
is on the last stage, which holds the logits. NCCL carries tensors between GPUs and gloo between
CPU processes; the driver's step plans (small numpy arrays) always go over a gloo group.

Launch: one machine, `param2moe serve/generate --tensor-parallel-size N` starts the other ranks
itself (`start_local_workers`) and watches them: a worker that dies takes the driver down with a
message. Several machines: start every process with torchrun (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT); rank 0 serves, the others run the worker loop.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..model.shard import Shard


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    enable_expert_parallel: bool = False

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def validate(self, cfg) -> None:
        tp, pp = self.tensor_parallel_size, self.pipeline_parallel_size
        if tp < 1 or pp < 1:
            raise ValueError("tensor_parallel_size and pipeline_parallel_size must be >= 1")
        rules = [(cfg.num_attention_heads % tp == 0, f"num_attention_heads ({cfg.num_attention_heads})"),
                 (cfg.num_kv_heads % tp == 0 or tp % cfg.num_kv_heads == 0,
                  f"num_key_value_heads ({cfg.num_kv_heads}) (or be a multiple of it)"),
                 (cfg.intermediate_size % tp == 0, f"intermediate_size ({cfg.intermediate_size})"),
                 (cfg.shared_expert_intermediate_size % tp == 0,
                  f"the shared-expert width ({cfg.shared_expert_intermediate_size})")]
        if cfg.is_moe:
            if self.enable_expert_parallel:
                rules.append((cfg.num_experts % tp == 0, f"num_experts ({cfg.num_experts})"))
            else:
                width = cfg.moe_intermediate_size
                rules.append((width % tp == 0, f"moe_intermediate_size ({width})"))
        for ok, what in rules:
            if not ok:
                raise ValueError(f"tensor_parallel_size={tp} must divide {what}")
        if pp > cfg.num_hidden_layers:
            raise ValueError(f"pipeline_parallel_size={pp} exceeds num_hidden_layers ({cfg.num_hidden_layers})")


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


def init_rank(rank: int, parallel: ParallelConfig, device_type: str) -> tuple[Shard, PlanComm, torch.device]:
    """Join the process group (MASTER_ADDR/MASTER_PORT from the environment) and build this rank's shard."""
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
                  next_stage_rank=rank - tp if stage < pp - 1 else None)
    return shard, PlanComm(cpu_group), device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_local_workers(engine_config, parallel: ParallelConfig) -> list[subprocess.Popen]:
    """Start ranks 1..world-1 on this machine and watch them; the caller becomes rank 0.

    Workers are fresh interpreters (`python -m param2moe.distributed`), so the caller's
    script needs no `if __name__ == "__main__"` guard, as multiprocessing's spawn would."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(_free_port())  # fresh: an engine started after another must not reuse it
    _stopping.clear()
    config_json = json.dumps(dataclasses.asdict(engine_config))
    procs = []
    for rank in range(1, parallel.world_size):
        cmd = [sys.executable, "-m", "param2moe.distributed", str(rank), config_json]
        procs.append(subprocess.Popen(cmd, env={**os.environ, "PARAM2MOE_WORKER_RANK": str(rank)}))
    threading.Thread(target=_watch, args=(procs,), daemon=True, name="param2moe-worker-watch").start()
    return procs


_stopping = threading.Event()  # set by the driver's shutdown: workers exiting then is expected


def stop_watching() -> None:
    _stopping.set()


def _watch(procs: list[subprocess.Popen]) -> None:
    while not _stopping.is_set():
        for rank, p in enumerate(procs, 1):
            code = p.poll()
            if code is not None and code != 0 and not _stopping.is_set():
                print(f"param2moe: worker rank {rank} died (exit code {code}); shutting down", file=sys.stderr,
                      flush=True)
                for q in procs:
                    if q.poll() is None:
                        q.kill()
                os._exit(1)
        time.sleep(0.2)


def main(argv: list[str]) -> None:
    """A worker rank started by start_local_workers (or by torchrun with RANK set)."""
    from ..engine.llm_engine import EngineConfig
    from ..engine.worker import worker_loop

    rank, config = int(argv[0]), EngineConfig(**json.loads(argv[1]))
    worker_loop(rank, config, config.parallel)

