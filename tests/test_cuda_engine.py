"""The engine on CUDA: decode steps replayed from CUDA graphs give the tokens of the eager path (the graph
inputs, the previous step's ids read inside the graph, padding to captured sizes). Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

from param2moe import LLM, SamplingParams
from param2moe.writer import preset_config, write_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("small32")
    write_checkpoint(str(path), preset_config("small", {"torch_dtype": "float32"}), seed=3)
    return str(path)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_graph_decode_equals_eager(checkpoint, async_scheduling):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(30, 2048, (int(n),), generator=g).tolist() for n in (20, 9, 33)]  # 3 rows: size 4
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1)
    outs = {}
    for eager in (True, False):
        llm = LLM(checkpoint, device="cuda", dtype="float32", kv_cache_memory=1 << 28, max_model_len=256,
                  max_num_seqs=8, enforce_eager=eager, async_scheduling=async_scheduling)
        outs[eager] = [o.outputs[0] for o in llm.generate(prompts, sp, use_tqdm=False)]
        del llm
    for a, b in zip(outs[True], outs[False]):
        assert a.token_ids == b.token_ids
        for la, lb, t in zip(a.logprobs, b.logprobs, a.token_ids):
            assert abs(la[t].logprob - lb[t].logprob) < 1e-3
