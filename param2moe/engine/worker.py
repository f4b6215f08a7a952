"""What every rank runs: load its shard of the model, size the KV cache (the same number of blocks
on every rank), build the model runner; workers then follow the driver's plans until told to stop."""

from __future__ import annotations

import os
import sys

import torch

from ..checkpoint import load_model
from ..kernels import Kernels, triton_available
from ..model.shard import Shard
from .config import EngineConfig, resolve_dtype
from .kv_cache import kv_bytes_per_token
from .model_runner import ModelRunner
from .sampler import Sampler


def build_runner(config, model_config, dtype, sampler: Sampler, shard=None, comm=None, device=None):
    """Returns (model, runner, num_blocks). Collective when comm is given: every rank calls it. The model's
    kernels are the sampler's; the decode graphs capture its greedy choice."""
    kernels = sampler.kernels
    device = device or torch.device(config.device)
    if shard is None and config.enable_eplb:  # one rank: its slots include the redundant experts
        shard = Shard(num_redundant_experts=config.num_redundant_experts)
    model = load_model(config.model, dtype, device, shard, config=model_config,
                       dummy=config.load_format == "dummy", seed=config.seed,
                       progress=shard is None or (shard.tp_rank == 0 and shard.is_last_stage), kernels=kernels,
                       quantization=config.quantization, quantize_head=config.quantize_head,
                       mmap_weights=config.mmap_weights and not (config.enable_lora or config.enable_eplb))
    if config.enable_lora:  # before any graph capture: the graphs read the slots
        from ..lora.slots import LoRASlots

        LoRASlots(model, config.max_loras, config.max_lora_rank, config.lora_routed_experts)
    elif device.type == "cuda" and kernels.native and triton_available("moe"):
        model.fold_shared_experts()  # the fused MoE takes the shared expert in its launches
    model.set_uniform_random_routing(bool(config.uniform_random_routing))
    max_model_len = config.max_model_len or model_config.max_position_embeddings
    per_block = kv_bytes_per_token(model) * config.block_size
    budget = config.kv_cache_memory
    if budget is None:
        if device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            budget = int(free - total * (1 - config.gpu_memory_utilization)) - (1 << 30)  # 1 GiB for activations
        else:  # enough for every sequence at full length, at most 2 GiB
            budget = min(2 << 30, per_block * config.max_num_seqs * -(-max_model_len // config.block_size))
    num_blocks = max(1, budget // per_block - 1)  # one block is the runner's scratch block
    if comm is not None:
        num_blocks = comm.all_min(num_blocks)
    pp = shard.pp_size if shard is not None else 1
    runner = ModelRunner(model, num_blocks, config.block_size, device, max_model_len,
                         comm=comm if comm is not None and torch.distributed.get_rank() == 0 else None,
                         num_microbatches=pp)
    if config.enable_eplb:  # its maps and counters exist before the graphs capture them
        from ..eplb import ExpertBalancer

        runner.eplb = ExpertBalancer(model, config, runner.kv.scratch_slot, dummy_weights=config.load_format == "dummy")
    if device.type == "cuda" and not config.enforce_eager and kernels.native and pp == 1:
        runner.enable_cuda_graphs(config.max_num_seqs, max_model_len, min(config.max_graph_tokens, config.token_budget),
                                  sampler.greedy)
    return model, runner, num_blocks


def worker_main(argv: list[str]) -> None:
    """`python -m param2moe.engine RANK CONFIG_JSON`: a rank started by the driver (distributed.LocalWorkers)."""
    from ..distributed import exit_with_parent

    exit_with_parent()
    rank, config = int(argv[0]), EngineConfig.from_json(argv[1])
    worker_loop(rank, config, config.parallel)


def worker_loop(rank: int, config: EngineConfig, parallel) -> None:
    """A non-driver rank: build its part, then run each plan the driver broadcasts (None: stop)."""
    from ..distributed import init_rank, stop_peer_watch

    device_type = "cuda" if str(config.device).startswith("cuda") else "cpu"
    shard, comm, device = init_rank(rank, parallel, device_type)
    model_config = config.model_config()
    sampler = Sampler([], kernels=Kernels(config.kernels))  # a worker samples nothing: its graphs' greedy ids
    _, runner, _ = build_runner(config, model_config, resolve_dtype(config, model_config), sampler, shard, comm,
                                device)
    while True:
        try:
            plan = comm.receive_plan()
            if plan is None:
                break
            runner.run_plan(plan)
        except RuntimeError as e:
            if "RANK" not in os.environ:  # started by the driver: it is watched (distributed.LocalWorkers)
                raise
            # torchrun: most likely a collective whose peer is gone; one line, not a traceback
            print(f"param2moe: rank {rank}: a step failed, the driver's node or process died? ({e}); shutting down",
                  file=sys.stderr, flush=True)
            raise SystemExit(1) from None
    stop_peer_watch()
    runner.release_cuda_graphs()
    torch.distributed.destroy_process_group()
