"""The CUDA graph runner's logic on the CPU: capture replaced by running the captured step again at each
replay (a graph replays its kernels on the same static buffers, so re-running the step on those buffers is
what a replay computes). Everything else is the runner's own: the static input buffers and their layout,
padding to the captured sizes, the previous step's ids read inside the "graph", the decode graphs' greedy
ids written for the next step. The engine with these graphs gives the eager engine's tokens and logprobs.
On a GPU, tests/test_cuda_engine.py checks the real graphs the same way."""

from __future__ import annotations

import pytest
import torch
from cases import preset_checkpoint

from param2moe import LLM, SamplingParams
from param2moe.engine import cuda_graphs
from param2moe.kernels import attention as torch_attention
from param2moe.writer import preset_config


class _Replay:
    def __init__(self, step, out):
        self.step, self.out = step, out

    def replay(self):
        torch_attention._last_layout[0] = None  # the torch path caches a step's layout by its tensors' identity
        self.out.copy_(self.step())

    def pool(self):
        return None


class _NoEvent:
    def record(self):
        pass

    def synchronize(self):
        pass


class EagerGraphs(cuda_graphs.CudaGraphRunner):
    def _capture(self, step, pool):
        out = step()
        return _Replay(step, out), out

    def _staging_buffer(self, key):
        return torch.empty(self.inputs[key].numel(), dtype=torch.int32), _NoEvent()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return preset_checkpoint(tmp_path_factory, "graphs_cpu", {"num_hidden_layers": 2, "vocab_size": 512}, seed=3)


def _with_graphs(llm, max_tokens: int, monkeypatch) -> dict:
    """Give the engine's runner the CPU stand-in of its CUDA graphs; count the replays of each kind."""
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    engine = llm.llm_engine
    runner = engine.runner
    runner.graphs = EagerGraphs(runner.model, runner.kv, engine.sampler.greedy, engine.config.max_num_seqs,
                                engine.max_model_len, max_tokens)
    counts = {"decode": 0, "tokens": 0}
    graphs = runner.graphs
    run, run_tokens = graphs.run, graphs.run_tokens

    def counted(fn, kind):
        def call(*args, **kwargs):
            counts[kind] += 1
            return fn(*args, **kwargs)
        return call

    graphs.run, graphs.run_tokens = counted(run, "decode"), counted(run_tokens, "tokens")
    return counts


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("max_num_batched_tokens", [256, 24])  # 24: prompts in chunks, beside decodes
def test_graph_steps_equal_eager_on_cpu(checkpoint, async_scheduling, max_num_batched_tokens, monkeypatch):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(30, 512, (int(n),), generator=g).tolist() for n in (20, 9, 33)]  # 3 rows: size 4
    again = [prompts[2][:32] + [5, 6, 7], prompts[0][:16] + prompts[1]]  # full blocks of earlier prompts: cached
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=1)
    outs, replays = {}, {}
    for graphs in (False, True):
        with LLM(checkpoint, device="cpu", dtype="float32", kv_cache_memory=1 << 22, max_model_len=128,
                 max_num_seqs=6, max_num_batched_tokens=max_num_batched_tokens,
                 async_scheduling=async_scheduling) as llm:
            replays[graphs] = _with_graphs(llm, 64, monkeypatch) if graphs else None
            outs[graphs] = [o.outputs[0] for batch in (prompts, again)
                            for o in llm.generate(batch, sp, use_tqdm=False)]
    assert replays[True]["decode"] > 0 and replays[True]["tokens"] >= 2
    for a, b in zip(outs[False], outs[True]):
        assert a.token_ids == b.token_ids
        for la, lb, t in zip(a.logprobs, b.logprobs, a.token_ids):
            assert abs(la[t].logprob - lb[t].logprob) < 1e-4


def test_graph_steps_with_adapters_equal_eager_on_cpu(checkpoint, tmp_path, monkeypatch):
    """Each row's adapter slot reaches the model through the graphs' static buffers (lora_index): a batch mixing
    two adapters and the base model, with one slot too few, gives the eager engine's tokens and logprobs."""
    from param2moe import LoRARequest
    from param2moe.lora.files import random_adapter

    cfg = preset_config("tiny", {"num_hidden_layers": 2, "vocab_size": 512})
    loras = [None]
    for i, kinds in enumerate((["qkv", "dense_mlp"], ["shared_experts", "routed_experts"]), 1):
        random_adapter(str(tmp_path / f"a{i}"), cfg, kinds, r=8, seed=i)
        loras.append(LoRARequest(f"a{i}", i, str(tmp_path / f"a{i}")))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(30, 512, (int(n),), generator=g).tolist() for n in (20, 9, 33, 12, 17)]
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
    outs, replays = {}, {}
    for graphs in (False, True):
        with LLM(checkpoint, device="cpu", dtype="float32", kv_cache_memory=1 << 22, max_model_len=128,
                 max_num_seqs=6, max_num_batched_tokens=64, enable_lora=True, max_loras=1, max_lora_rank=8,
                 lora_routed_experts=True) as llm:
            replays[graphs] = _with_graphs(llm, 64, monkeypatch) if graphs else None
            outs[graphs] = [o.outputs[0] for o in llm.generate(prompts, sp, use_tqdm=False,
                                                               lora_request=[loras[i % 3] for i in range(5)])]
    assert replays[True]["decode"] > 0 and replays[True]["tokens"] >= 1
    for a, b in zip(outs[False], outs[True]):
        assert a.token_ids == b.token_ids
        for la, lb, t in zip(a.logprobs, b.logprobs, a.token_ids):
            assert abs(la[t].logprob - lb[t].logprob) < 1e-4
