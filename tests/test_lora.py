"""Serving LoRA adapters (param2moe/lora/): the engine with an adapter gives what a checkpoint with that
adapter merged into its weights gives (fp32, prompt logprobs within 1e-4, the same greedy tokens), for
each kind of target module; a batch mixing adapters and the base model gives each request its own
merged-model result; the prefix cache never shares blocks across adapters; bad adapters are refused
with the tensor named.

Oracle: `merge_adapter` (W + scale * B @ A, in float64, written as a plain checkpoint) run by the engine
without LoRA.
"""

from __future__ import annotations

import functools
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from param2moe import LLM, LoRARequest, SamplingParams
from param2moe.engine import EngineError
from param2moe.lora import LoRAError, load_adapter
from param2moe.lora.adapter import module_scale
from param2moe.lora.files import KINDS, merge_adapter, random_adapter
from param2moe.writer import preset_config, write_checkpoint

TOL = 1e-4
PROMPTS = [[30 + (i * 37) % 400 for i in range(21)], [100, 200, 300, 45, 46, 47, 48], [77] * 5]
GREEDY = SamplingParams(temperature=0, max_tokens=6, prompt_logprobs=0, logprobs=0)
ENGINE = dict(max_model_len=256, kv_cache_memory=8 << 20)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def cfg():
    return preset_config("tiny", {"num_hidden_layers": 2})  # a dense layer, then MoE with a shared expert


@pytest.fixture(scope="module")
def base(tmp_path_factory, cfg) -> str:
    out = str(tmp_path_factory.mktemp("lora-base"))
    write_checkpoint(out, cfg, seed=5, head_std=0.2)
    return out


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, base, cfg):
    """adapters(name, kinds, **options) -> (adapter folder, merged checkpoint folder), made once."""
    root = tmp_path_factory.mktemp("lora-adapters")

    @functools.cache
    def make(name: str, kinds: tuple[str, ...], **options):
        folder, merged = str(root / name), str(root / f"{name}-merged")
        random_adapter(folder, cfg, list(kinds), **options)
        merge_adapter(base, folder, merged)
        return folder, merged

    return make


@functools.cache
def _llm(path: str, **options) -> LLM:
    return LLM(path, **ENGINE, **options)


@pytest.fixture(scope="module")
def lora_llm(base):
    return _llm(base, enable_lora=True, max_loras=2, max_lora_rank=16, lora_routed_experts=True)


def assert_same(got, want, what=""):
    assert got.outputs[0].token_ids == want.outputs[0].token_ids, what
    for pos, (g, w) in enumerate(zip(got.prompt_logprobs[1:], want.prompt_logprobs[1:]), 1):
        tok = got.prompt_token_ids[pos]
        assert abs(g[tok].logprob - w[tok].logprob) <= TOL, (what, pos, g[tok].logprob, w[tok].logprob)
    for g, w, tok in zip(got.outputs[0].logprobs, want.outputs[0].logprobs, got.outputs[0].token_ids):
        assert abs(g[tok].logprob - w[tok].logprob) <= TOL, what


def max_prompt_diff(a, b) -> float:
    return max(abs(x[t].logprob - y[t].logprob)
               for x, y, t in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:], a.prompt_token_ids[1:]))


# ------------------------------------------------------------------------------------ equal to merged
@pytest.mark.parametrize("kind", list(KINDS))
def test_adapter_equals_merged_checkpoint(kind, adapters, lora_llm, base):
    folder, merged = adapters(kind, (kind,), r=8, seed=list(KINDS).index(kind))
    request = LoRARequest(kind, 1 + list(KINDS).index(kind), folder)
    got = lora_llm.generate(PROMPTS, GREEDY, use_tqdm=False, lora_request=request)
    want = _llm(merged).generate(PROMPTS, GREEDY, use_tqdm=False)
    plain = _llm(base).generate(PROMPTS, GREEDY, use_tqdm=False)
    for g, w in zip(got, want):
        assert_same(g, w, kind)
    assert max(max_prompt_diff(w, p) for w, p in zip(want, plain)) > 100 * TOL  # the adapter changes the model


def test_rslora_and_alpha_pattern_scales(adapters, lora_llm, cfg, tmp_path):
    """rsLoRA scales by alpha / sqrt(r); alpha_pattern gives a module its own alpha (PEFT's rules)."""
    folder, _ = adapters("rs", ("qkv", "dense_mlp"), r=16, lora_alpha=8, use_rslora=True, seed=3)
    conf = json.load(open(os.path.join(folder, "adapter_config.json")))
    conf["alpha_pattern"] = {"mlp.down_proj": 2.0}
    assert module_scale(conf, "model.layers.0.mlp.down_proj") == (16, 2.0 / 4)
    assert module_scale(conf, "model.layers.0.mlp.up_proj") == (16, 8 / 4)
    assert module_scale({**conf, "use_rslora": False}, "model.layers.0.mlp.up_proj") == (16, 8 / 16)
    patterned = tmp_path / "patterned"
    patterned.mkdir()
    json.dump(conf, open(patterned / "adapter_config.json", "w"))
    os.link(os.path.join(folder, "adapter_model.safetensors"), patterned / "adapter_model.safetensors")
    merged = tmp_path / "merged"
    merge_adapter(lora_llm.llm_engine.config.model, str(patterned), str(merged))
    got = lora_llm.generate(PROMPTS, GREEDY, use_tqdm=False, lora_request=LoRARequest("rs", 20, str(patterned)))
    for g, w in zip(got, _llm(str(merged)).generate(PROMPTS, GREEDY, use_tqdm=False)):
        assert_same(g, w, "rslora")


# ------------------------------------------------------------------------------------ mixed batches
def test_mixed_batch_gives_each_request_its_own_model(adapters, base):
    """Three adapters and the base model in one generate call, with two slots: requests of the third
    adapter wait for a slot while base requests go on; each gets its merged model's result."""
    llm = _llm(base, enable_lora=True, max_loras=2, max_lora_rank=16, lora_routed_experts=True, max_num_seqs=8)
    kinds = {"a": ("qkv", "dense"), "b": ("dense_mlp", "shared_experts"), "c": tuple(KINDS)}
    made = {name: adapters(f"mix-{name}", k, r=4 + 4 * i, seed=10 + i) for i, (name, k) in enumerate(kinds.items())}
    requests = {name: LoRARequest(name, 30 + i, folder) for i, (name, (folder, _)) in enumerate(made.items())}
    order = [None, "a", "b", "c", None, "c", "a", "b", "c", None]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(order))]
    got = llm.generate(prompts, GREEDY, use_tqdm=False, lora_request=[requests.get(n) for n in order])
    for name, prompt, out in zip(order, prompts, got):
        path = base if name is None else made[name][1]
        assert_same(out, _llm(path).generate([prompt], GREEDY, use_tqdm=False)[0], name)


def test_prefix_cache_is_not_shared_across_adapters(adapters, base):
    llm = _llm(base, enable_lora=True, max_loras=1, max_lora_rank=8)  # prefix caching is on by default
    folder, merged = adapters("prefix", ("qkv",), r=8, seed=4)
    request = LoRARequest("prefix", 40, folder)
    prompt = [30 + (i * 11) % 300 for i in range(50)]  # three full blocks of 16
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=0)  # (prompt logprobs skip the cache)
    first = llm.generate([prompt], params, use_tqdm=False)[0]
    want = _llm(merged).generate([prompt], params, use_tqdm=False)[0].outputs[0]
    for n_cached in (0, 48):  # the base model's blocks are not its own; its own blocks are
        got = llm.generate([prompt], params, use_tqdm=False, lora_request=request)[0]
        assert got.num_cached_tokens == n_cached
        assert got.outputs[0].token_ids == want.token_ids
        for g, w, tok in zip(got.outputs[0].logprobs, want.logprobs, want.token_ids):
            assert abs(g[tok].logprob - w[tok].logprob) <= TOL
    again = llm.generate([prompt], params, use_tqdm=False)[0]
    assert again.num_cached_tokens == 48 and again.outputs[0].token_ids == first.outputs[0].token_ids


# ------------------------------------------------------------------------------------ refused
def _broken(tmp_path, adapters, edit_tensors=None, edit_config=None) -> str:
    folder, _ = adapters("good", ("qkv", "dense_mlp"), r=8, seed=7)
    out = tmp_path / "broken"
    out.mkdir()
    conf = json.load(open(os.path.join(folder, "adapter_config.json")))
    tensors = load_file(os.path.join(folder, "adapter_model.safetensors"))
    if edit_config:
        edit_config(conf)
    if edit_tensors:
        edit_tensors(tensors)
    json.dump(conf, open(out / "adapter_config.json", "w"))
    save_file(tensors, str(out / "adapter_model.safetensors"))
    return str(out)


QKV = "base_model.model.model.layers.1.attention.query_key_value"


@pytest.mark.parametrize("case,edit_tensors,edit_config,message", [
    ("wrong shape", lambda t: t.update({QKV + ".lora_B.weight": torch.zeros(100, 8)}), None,
     QKV + ".lora_B.weight' has shape [100, 8], expected [256, 8]"),
    ("wrong input width", lambda t: t.update({QKV + ".lora_A.weight": torch.zeros(8, 64)}), None,
     QKV + ".lora_A.weight' has shape [8, 64], expected [r, 128]"),
    ("rank above the slots'", lambda t: t.update({QKV + ".lora_A.weight": torch.zeros(32, 128),
                                                  QKV + ".lora_B.weight": torch.zeros(256, 32)}),
     lambda c: c.update(rank_pattern={r"layers\.1\.attention\.query_key_value": 32}),
     "rank 32, more than max_lora_rank=16"),
    ("rank against config", None, lambda c: c.update(r=4), "has rank 8, but adapter_config.json gives"),
    ("no partner", lambda t: t.pop(QKV + ".lora_B.weight"), None, QKV + ".lora_A.weight' has no lora_B partner"),
    ("unknown module", lambda t: t.update({"base_model.model.model.layers.7.attention.dense.lora_A.weight":
                                           torch.zeros(8, 128),
                                           "base_model.model.model.layers.7.attention.dense.lora_B.weight":
                                           torch.zeros(128, 8)}), None,
     "layers.7.attention.dense.lora_A.weight': not a module of this base model"),
    ("embeddings", lambda t: t.update({"base_model.model.model.word_embeddings.lora_embedding_A": torch.zeros(8, 512)}),
     None, "word_embeddings.lora_embedding_A' is not a LoRA weight"),
    ("non-finite", lambda t: t[QKV + ".lora_A.weight"].fill_(float("nan")), None,
     QKV + ".lora_A.weight' must hold finite"),
    ("DoRA", None, lambda c: c.update(use_dora=True), "use_dora=True: DoRA adapters are not served"),
    ("modules_to_save", None, lambda c: c.update(modules_to_save=["lm_head"]), "modules_to_save=['lm_head']"),
    ("not LoRA", None, lambda c: c.update(peft_type="IA3"), "peft_type='IA3'"),
])
def test_bad_adapter_is_refused_with_its_fault_named(case, edit_tensors, edit_config, message, tmp_path, adapters,
                                                       lora_llm):
    folder = _broken(tmp_path, adapters, edit_tensors, edit_config)
    with pytest.raises(LoRAError, match=None) as err:
        lora_llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False, lora_request=LoRARequest(case, 99, folder))
    assert message in str(err.value), str(err.value)
    assert lora_llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)[0].outputs[0].token_ids  # the engine goes on


def test_missing_files_and_routed_experts_without_their_slots(tmp_path, adapters, base, cfg):
    with pytest.raises(LoRAError, match="no adapter_config.json"):
        load_adapter(str(tmp_path), cfg, 16)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 8}))
    (tmp_path / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(LoRAError, match="adapter_model.bin is there: pickle files are not loaded"):
        load_adapter(str(tmp_path), cfg, 16)
    folder, _ = adapters("routed_experts", ("routed_experts",), r=8, seed=list(KINDS).index("routed_experts"))
    llm = _llm(base, enable_lora=True, max_lora_rank=8)
    with pytest.raises(LoRAError, match=r"targets routed experts \(model.layers.1.mlp.experts.0.down_proj.*"
                                        "lora_routed_experts"):
        llm.llm_engine.add_lora(LoRARequest("experts", 50, folder))


def test_requests_and_registry_errors(adapters, base, lora_llm):
    folder, _ = adapters("qkv", ("qkv",), r=8, seed=0)
    with pytest.raises(EngineError, match="started without enable_lora"):
        _llm(base).generate(PROMPTS[:1], GREEDY, use_tqdm=False, lora_request=LoRARequest("x", 1, folder))
    with pytest.raises(ValueError, match="lora_int_id=0: must be a positive integer"):
        LoRARequest("x", 0, folder)
    engine = lora_llm.llm_engine
    engine.add_lora(LoRARequest("reg", 60, folder))
    with pytest.raises(LoRAError, match="lora_int_id 60 is already adapter 'reg'"):
        engine.add_lora(LoRARequest("other", 60, folder + "-elsewhere"))
    with pytest.raises(LoRAError, match="lora_name 'reg' is already adapter id 60"):
        engine.add_lora(LoRARequest("reg", 61, folder))
    engine.add_request("busy", PROMPTS[0], GREEDY, lora_request=LoRARequest("reg", 60, folder))
    with pytest.raises(LoRAError, match="in use by 1 unfinished request"):
        engine.remove_lora(60)
    engine.abort("busy")
    assert engine.remove_lora(60) and not engine.remove_lora(60)
    assert all(a.lora_id != 60 for a in engine.list_loras())
    with pytest.raises(ValueError, match=r"max_lora_rank=128: must be in \[1, 64\]"):
        LLM(base, enable_lora=True, max_lora_rank=128, **ENGINE)


def test_adapter_over_a_quantized_base(adapters, base):
    """int8 weights: the adapter's delta is added to the quantized projections' outputs, so the result is the
    merged model's within the quantization's error (far closer than the quantized base alone); adapters of
    quantized routed experts are refused at start."""
    folder, merged = adapters("dense_mlp", ("dense_mlp",), r=8, seed=list(KINDS).index("dense_mlp"))
    want = _llm(merged).generate(PROMPTS[:1], GREEDY, use_tqdm=False)[0]
    llm = _llm(base, quantization="int8", enable_lora=True, max_lora_rank=8)
    got = llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False, lora_request=LoRARequest("q", 70, folder))[0]
    plain = llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)[0]
    assert max_prompt_diff(got, want) < 0.1 * max_prompt_diff(plain, want)
    with pytest.raises(LoRAError, match="adapters of quantized routed experts are not served"):
        LLM(base, quantization="int8", enable_lora=True, lora_routed_experts=True, **ENGINE)
