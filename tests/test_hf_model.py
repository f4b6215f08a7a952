"""The transformers class (param2moe/hf_model.py) on tiny float32 checkpoints: it agrees with the engine
(prompt logprobs within 1e-4, the same greedy tokens, with left padding too), trains (a loss, gradients
that gradient checkpointing does not change), saves under the checkpoint's names, and works with PEFT:
an adapter it trains is served by the engine with the PEFT model's logprobs, and PEFT's merge_and_unload
gives the same model (a second, independent merge). Skipped without the `lora` extra.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from param2moe import LLM, LoRARequest, SamplingParams  # noqa: E402
from param2moe.hf_model import Param2MoEForCausalLM  # noqa: E402
from param2moe.writer import preset_config, write_checkpoint  # noqa: E402

TOL = 1e-4
PROMPTS = [[30 + (i * 37) % 400 for i in range(19)], [100, 200, 300, 45, 46, 47, 48]]
ENGINE = dict(max_model_len=256, kv_cache_memory=8 << 20)
GREEDY = SamplingParams(temperature=0, max_tokens=6, prompt_logprobs=0)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("hf-base"))
    write_checkpoint(out, preset_config("tiny", {"num_hidden_layers": 2}), seed=5, head_std=0.2)
    return out


@pytest.fixture(scope="module")
def engine_out(base):
    return LLM(base, **ENGINE).generate(PROMPTS, GREEDY, use_tqdm=False)


def load(path: str) -> Param2MoEForCausalLM:
    return Param2MoEForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def prompt_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        lp = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
    return lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]


def engine_prompt_logprobs(out) -> torch.Tensor:
    return torch.tensor([e[t].logprob for e, t in zip(out.prompt_logprobs[1:], out.prompt_token_ids[1:])])


def test_agrees_with_the_engine(base, engine_out):
    model = load(base)
    for ids, out in zip(PROMPTS, engine_out):
        torch.testing.assert_close(prompt_logprobs(model, ids), engine_prompt_logprobs(out), rtol=0, atol=TOL)
        gen = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)
        assert gen[0, len(ids):].tolist() == out.outputs[0].token_ids


def test_agrees_with_the_engine_on_another_layout(tmp_path):
    """Biases, an untied head, grouped softmax routing, partial YaRN RoPE, no QK-norm."""
    cfg = preset_config("tiny", {"num_hidden_layers": 3, "use_qkv_bias": True, "use_bias": True,
                                 "tie_word_embeddings": False, "n_group": 2, "topk_group": 1, "use_qk_norm": False,
                                 "score_function": "softmax", "partial_rotary_factor": 0.5,
                                 "rope_scaling": {"rope_type": "yarn", "factor": 2.0,
                                                  "original_max_position_embeddings": 1024}})
    write_checkpoint(str(tmp_path), cfg, seed=2, head_std=0.2)
    out = LLM(str(tmp_path), **ENGINE).generate(PROMPTS[:1], GREEDY, use_tqdm=False)[0]
    model = load(str(tmp_path))
    torch.testing.assert_close(prompt_logprobs(model, PROMPTS[0]), engine_prompt_logprobs(out), rtol=0, atol=TOL)
    gen = model.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=6, do_sample=False)
    assert gen[0, len(PROMPTS[0]):].tolist() == out.outputs[0].token_ids


def test_batched_generate_with_left_padding(base, engine_out):
    model = load(base)
    width = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    gen = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert [g[width:].tolist() for g in gen] == [o.outputs[0].token_ids for o in engine_out]


def test_training_step_with_gradient_checkpointing(base):
    batch = torch.tensor(PROMPTS[0][:16] * 2).reshape(2, 16)

    def loss_and_grads(checkpointing: bool):
        model = load(base).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        return model, loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    model, loss, grads = loss_and_grads(False)
    _, loss_ckpt, grads_ckpt = loss_and_grads(True)
    assert torch.equal(loss, loss_ckpt) and grads.keys() == grads_ckpt.keys()
    assert any(".experts." in n for n in grads) and "model.layers.1.mlp.gate.weight" in grads
    for name, g in grads.items():
        torch.testing.assert_close(grads_ckpt[name], g, rtol=1e-5, atol=1e-7, msg=name)
    logits = model(input_ids=batch).logits[:, :-1].reshape(-1, model.config.vocab_size)
    manual = torch.nn.functional.cross_entropy(logits, batch[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, manual)
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 1e-2 * p.grad
    assert model(input_ids=batch, labels=batch).loss < loss  # a small step down the gradient lowers the loss


def test_saves_under_the_checkpoint_names(base, engine_out, tmp_path):
    model = load(base)
    model.save_pretrained(tmp_path / "saved")
    from safetensors.torch import load_file

    names = set(load_file(os.path.join(base, "model.safetensors")))
    assert set(load_file(tmp_path / "saved" / "model.safetensors")) == names
    again = LLM(str(tmp_path / "saved"), **ENGINE).generate(PROMPTS, GREEDY, use_tqdm=False)
    for a, b in zip(again, engine_out):
        torch.testing.assert_close(engine_prompt_logprobs(a), engine_prompt_logprobs(b), rtol=0, atol=TOL)


def test_auto_classes(base, tmp_path):
    from transformers import AutoModelForCausalLM

    conf = json.load(open(os.path.join(base, "config.json")))
    for name in os.listdir(base):
        os.link(os.path.join(base, name), tmp_path / name) if name != "config.json" else None
    json.dump({**conf, "model_type": "bailing_moe_v2"}, open(tmp_path / "config.json", "w"))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    assert isinstance(model, Param2MoEForCausalLM) and model.config.model_type == "bailing_moe_v2"
    torch.testing.assert_close(prompt_logprobs(model.eval(), PROMPTS[0]), prompt_logprobs(load(base), PROMPTS[0]))


def test_peft_adapter_is_served_by_the_engine(base, tmp_path):
    """LoRA on every kind of module (routed experts too), rsLoRA, trained a few steps with PEFT."""
    config = peft.LoraConfig(r=8, lora_alpha=16, use_rslora=True, lora_dropout=0.0, init_lora_weights=False,
                             target_modules=["query_key_value", "dense", "gate_proj", "up_proj", "down_proj"])
    model = peft.get_peft_model(load(base).train(), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = torch.tensor(PROMPTS[0][:16] * 2).reshape(2, 16)
    for _ in range(2):
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval().save_pretrained(tmp_path / "adapter")
    llm = LLM(base, enable_lora=True, max_lora_rank=8, lora_routed_experts=True, **ENGINE)
    served = llm.generate(PROMPTS, GREEDY, use_tqdm=False, lora_request=LoRARequest("trained", 1,
                                                                                    str(tmp_path / "adapter")))
    plain = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    merged_dir = tmp_path / "merged"
    model.merge_and_unload().save_pretrained(merged_dir)
    merged = LLM(str(merged_dir), **ENGINE).generate(PROMPTS, GREEDY, use_tqdm=False)
    for ids, s, p, m in zip(PROMPTS, served, plain, merged):
        torch.testing.assert_close(engine_prompt_logprobs(s), prompt_logprobs(model, ids), rtol=0, atol=TOL)
        torch.testing.assert_close(engine_prompt_logprobs(s), engine_prompt_logprobs(m), rtol=0, atol=TOL)
        assert s.outputs[0].token_ids == m.outputs[0].token_ids
        assert (engine_prompt_logprobs(s) - engine_prompt_logprobs(p)).abs().max() > 100 * TOL
