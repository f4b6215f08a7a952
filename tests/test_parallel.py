"""Tensor, expert and pipeline parallelism on CPU (gloo processes) against one process: the same
greedy tokens, and logprobs within 1e-4 (float32)."""

import subprocess
import sys
import textwrap

import pytest
from cases import preset_checkpoint

from param2moe import LLM, SamplingParams

PROMPTS = [list(range(30, 30 + n)) for n in (5, 17, 40)]
PARAMS = SamplingParams(temperature=0, max_tokens=12, logprobs=1, prompt_logprobs=0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # 4 query heads over 2 KV heads, 8 experts, one dense layer then MoE layers: splits evenly over 2 ranks.
    return preset_checkpoint(tmp_path_factory, "tp", {"num_hidden_layers": 4, "num_shared_experts": 2,
                                                      "moe_shared_expert_intermediate_size": 128}, seed=1)


@pytest.fixture(scope="module")
def reference(checkpoint):
    return LLM(checkpoint, kv_cache_memory=1 << 24).generate(PROMPTS, PARAMS, use_tqdm=False)


@pytest.mark.parametrize("parallel", [
    dict(tensor_parallel_size=2),
    dict(tensor_parallel_size=2, async_scheduling=True),  # inputs from the driver's sampled ids
    dict(tensor_parallel_size=2, enable_expert_parallel=True),
    dict(pipeline_parallel_size=2),
    dict(tensor_parallel_size=2, pipeline_parallel_size=2),
], ids=["tp2", "tp2-overlap", "ep2", "pp2", "tp2xpp2"])
def test_parallel_matches_single_process(checkpoint, reference, parallel):
    llm = LLM(checkpoint, kv_cache_memory=1 << 24, **parallel)
    try:
        outs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    finally:
        llm.llm_engine.shutdown()
    for prompt, ref, out in zip(PROMPTS, reference, outs):
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
        for a, b, tok in zip(ref.outputs[0].logprobs, out.outputs[0].logprobs, ref.outputs[0].token_ids):
            assert abs(a[tok] - b[tok]) <= 1e-4
        for a, b, tok in zip(ref.prompt_logprobs[1:], out.prompt_logprobs[1:], prompt[1:]):
            assert abs(a[tok] - b[tok]) <= 1e-4


def test_dead_worker_stops_the_driver_with_a_message(checkpoint):
    script = textwrap.dedent(f"""
        import time
        from param2moe import LLM, SamplingParams
        llm = LLM({checkpoint!r}, kv_cache_memory=1 << 24, tensor_parallel_size=2)
        llm.llm_engine.ranks.workers.procs[0].kill()
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=1000, ignore_eos=True), use_tqdm=False)
        time.sleep(30)
        print("still running")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "worker rank 1 died" in proc.stderr and "still running" not in proc.stdout, proc.stderr[-3000:]


def test_bad_parallel_sizes_are_named(checkpoint):
    with pytest.raises(ValueError, match="tensor_parallel_size=3 must divide num_attention_heads"):
        LLM(checkpoint, tensor_parallel_size=3)
    with pytest.raises(ValueError, match="pipeline_parallel_size=9 exceeds num_hidden_layers"):
        LLM(checkpoint, pipeline_parallel_size=9)


def test_torchrun_ranks_follow_rank_zero(checkpoint):
    """Started by torchrun (as on several machines): rank 0 runs the command, rank 1 follows its plans; the
    tokens are one process's."""
    import os

    argv = ["-m", "param2moe.cli", "generate", "--model", checkpoint, "--prompt", "The river", "--max-tokens", "6",
            "--temperature", "0", "--ignore-eos", "--device", "cpu", "--kv-cache-memory", str(1 << 24)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120, env=env)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", *argv, "-tp", "2"],
                         capture_output=True, text=True, timeout=180, env=env)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.strip() == one.stdout.strip() and one.stdout.strip()
