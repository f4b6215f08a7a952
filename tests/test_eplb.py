"""Expert load balancing in the engine (CPU, gloo): expert parallelism over 2 ranks with redundant experts and
rearrangements in the middle of generation gives one process's tokens and logprobs (float32), and the
imbalance of the busiest rank falls once the experts are rearranged."""

import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from param2moe import LLM, SamplingParams
from param2moe.engine import EngineError
from param2moe.writer import preset_config, write_checkpoint

PROMPTS = [list(range(30, 30 + n)) for n in (5, 17, 40)]
PARAMS = SamplingParams(temperature=0, max_tokens=16, logprobs=1, prompt_logprobs=0)
EP2 = dict(tensor_parallel_size=2, enable_expert_parallel=True)


@pytest.fixture(scope="module")
def skewed(tmp_path_factory):
    """A checkpoint whose routers favour experts 2 and 3 (and 4 a little): all on rank 0 at first."""
    path = str(tmp_path_factory.mktemp("skewed"))
    write_checkpoint(path, preset_config("tiny", {"num_hidden_layers": 4, "num_shared_experts": 2,
                                                  "moe_shared_expert_intermediate_size": 128}), seed=1)
    tensors = load_file(f"{path}/model.safetensors")
    for name, t in tensors.items():
        if name.endswith("expert_bias"):
            t[2:4] += 0.6
            t[4] += 0.3
    save_file(tensors, f"{path}/model.safetensors", metadata={"format": "pt"})
    return path


def _run(engine, prompts, params, on_step=None) -> list:
    """Generate step by step (on_step(engine, step) after each); outputs in prompt order."""
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    done, step = {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        step += 1
        if on_step is not None:
            on_step(engine, step)
    return [done[str(i)] for i in range(len(prompts))]


def _assert_same(prompts, ref, outs, tol=1e-4):
    for prompt, a, b in zip(prompts, ref, outs):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids
        for x, y, tok in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, a.outputs[0].token_ids):
            assert abs(x[tok] - y[tok]) <= tol
        for x, y, tok in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:], prompt[1:]):
            assert abs(x[tok] - y[tok]) <= tol


def test_ep2_rearranging_mid_generation_matches_one_process(skewed):
    ref = LLM(skewed, kv_cache_memory=1 << 24).generate(PROMPTS, PARAMS, use_tqdm=False)
    seen = {}

    def watch(engine, step):
        if step in (6, 7):  # the 7th step rearranges first (every 6 steps)
            seen[step] = engine.expert_load()

    with LLM(skewed, kv_cache_memory=1 << 24, enable_eplb=True, num_redundant_experts=2, eplb_step_interval=6,
             eplb_window_size=32, **EP2) as llm:
        outs = _run(llm.llm_engine, PROMPTS, PARAMS, watch)
        final = llm.expert_load()
        metrics = _eplb_metrics(llm.llm_engine)
    _assert_same(PROMPTS, ref, outs)
    before, after = seen[6], seen[7]
    assert before.rearrangements == 0 and after.rearrangements == 1 and final.rearrangements == 2
    assert (before.placement[:, :8] == range(8)).all()  # the initial placement: expert p in slot p
    assert not (after.placement == before.placement).all()
    hot = before.tokens[:, 2:4].sum() / before.tokens.sum()
    assert hot > 0.4, before.tokens  # the router is skewed: experts 2 and 3 take 2 in 5 pairs (uniform: 1 in 4)
    assert before.imbalance.min() > 1.3 and after.imbalance.max() < 1.1, (before.imbalance, after.imbalance)
    for tokens, placement in zip(before.tokens, after.placement):  # each layer's busiest expert is replicated
        assert (placement == tokens.argmax()).sum() >= 2
    assert metrics and all(abs(metrics[layer] - v) < 1e-6 for layer, v in zip(final.layers, final.imbalance))


def _eplb_metrics(engine) -> dict[int, float]:
    """The server's /metrics text for this engine: param2moe:eplb_imbalance by layer."""
    from param2moe.engine.async_engine import AsyncLLMEngine
    from param2moe.server.metrics import ServerMetrics

    text = ServerMetrics(AsyncLLMEngine(engine), "m").render().decode()
    return {int(layer): float(v) for layer, v in
            re.findall(r'param2moe:eplb_imbalance\{layer="(\d+)",model_name="m"\} (\S+)', text)}


def test_default_model_ep2_with_eplb_matches_one_process():
    """The model LLM() loads by default, in float32."""
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=1, prompt_logprobs=0)
    prompts = [list(range(3, 3 + n)) for n in (4, 23)]
    ref = LLM(dtype="float32", kv_cache_memory=1 << 24, max_model_len=512).generate(prompts, params, use_tqdm=False)
    with LLM(dtype="float32", kv_cache_memory=1 << 24, max_model_len=512, enable_eplb=True, num_redundant_experts=2,
             eplb_step_interval=4, **EP2) as llm:
        outs = llm.generate(prompts, params, use_tqdm=False)
        load = llm.expert_load()
        k = llm.llm_engine.model_config.num_experts_per_tok
    _assert_same(prompts, ref, outs)
    assert load.rearrangements >= 2
    # every layer counts each computed token's k experts: the prompts, then a token a step but the last
    assert load.tokens.sum(1).tolist() == [k * (sum(map(len, prompts)) + 2 * (params.max_tokens - 1))] * len(
        load.layers)


def test_eplb_settings_are_checked(skewed):
    with pytest.raises(ValueError, match="num_redundant_experts=2 needs enable_eplb"):
        LLM(skewed, num_redundant_experts=2)
    with pytest.raises(ValueError, match="enable_eplb needs enable_expert_parallel"):
        LLM(skewed, enable_eplb=True, tensor_parallel_size=2)
    with pytest.raises(ValueError, match=r"num_experts \+ num_redundant_experts \(8 \+ 1\) divisible"):
        LLM(skewed, enable_eplb=True, num_redundant_experts=1, **EP2)
    with pytest.raises(ValueError, match="eplb_step_interval=0: must be at least 1"):
        LLM(skewed, enable_eplb=True, eplb_step_interval=0)
    with pytest.raises(EngineError, match="need enable_eplb"):
        LLM(skewed, kv_cache_memory=1 << 23).expert_load()


def test_one_rank_with_replicas_matches(skewed):
    """One process with redundant experts (the one-GPU layout): same tokens; replicas copies of their expert."""
    ref = LLM(skewed, kv_cache_memory=1 << 24).generate(PROMPTS[:2], PARAMS, use_tqdm=False)
    llm = LLM(skewed, kv_cache_memory=1 << 24, enable_eplb=True, num_redundant_experts=3, eplb_step_interval=5)
    _assert_same(PROMPTS[:2], ref, llm.generate(PROMPTS[:2], PARAMS, use_tqdm=False))
    load = llm.expert_load()
    assert load.rearrangements >= 2 and (load.imbalance == 1.0).all()  # one rank: balanced by definition
    moe = llm.llm_engine.model.moe_layers[0]
    for slot, expert in enumerate(moe.slot_experts):
        first = moe.slot_experts.index(expert)
        assert torch.equal(moe.w13[slot], moe.w13[first]) and torch.equal(moe.w2[slot], moe.w2[first])
