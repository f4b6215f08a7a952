"""The engine on CUDA: steps replayed from CUDA graphs give the tokens of the eager path (the graph inputs,
the previous step's ids read inside the graph, padding to captured sizes). Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch
from cases import preset_checkpoint

from param2moe import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return preset_checkpoint(tmp_path_factory, "small32", {"torch_dtype": "float32"}, preset="small", seed=3)


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("max_num_batched_tokens", [2048, 32])  # 32: prompts in chunks, beside decodes
def test_graph_steps_equal_eager(checkpoint, async_scheduling, max_num_batched_tokens):
    """Every step replayed from a graph (decode graphs, and token graphs for prefills, chunks and mixed steps)
    gives the eager path's tokens and logprobs, with prefix-cache hits (a context longer than the new tokens)."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(30, 2048, (int(n),), generator=g).tolist() for n in (20, 9, 33)]  # 3 rows: size 4
    again = [prompts[2][:32] + [5, 6, 7], prompts[0][:16] + prompts[1]]  # full blocks of earlier prompts: cached
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1)
    outs, replays = {}, {}
    for eager in (True, False):
        llm = LLM(checkpoint, device="cuda", dtype="float32", kv_cache_memory=1 << 28, max_model_len=256,
                  max_num_seqs=8, max_num_batched_tokens=max_num_batched_tokens, enforce_eager=eager,
                  async_scheduling=async_scheduling)
        graphs = llm.llm_engine.runner.graphs
        counts = replays[eager] = {"decode": 0, "tokens": 0}
        if graphs is not None:
            run, run_tokens = graphs.run, graphs.run_tokens

            def counted(fn, kind, counts=counts):
                def call(*args, **kwargs):
                    counts[kind] += 1
                    return fn(*args, **kwargs)
                return call

            graphs.run, graphs.run_tokens = counted(run, "decode"), counted(run_tokens, "tokens")
        outs[eager] = [o.outputs[0] for batch in (prompts, again) for o in llm.generate(batch, sp, use_tqdm=False)]
        del llm
    assert replays[True] == {"decode": 0, "tokens": 0}
    assert replays[False]["decode"] > 0 and replays[False]["tokens"] >= 2  # (at least one prefill each generate)
    for a, b in zip(outs[True], outs[False]):
        assert a.token_ids == b.token_ids
        for la, lb, t in zip(a.logprobs, b.logprobs, a.token_ids):
            assert abs(la[t].logprob - lb[t].logprob) < 1e-3
