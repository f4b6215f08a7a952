"""benchmarks/peaked_checkpoint.py: a short training run writes a folder the engine loads, with trained weights."""

from __future__ import annotations

import importlib.util
import os

import torch
from safetensors.torch import load_file

from param2moe import LLM, SamplingParams
from param2moe.writer import write_checkpoint

_PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "peaked_checkpoint.py")
_spec = importlib.util.spec_from_file_location("peaked_checkpoint", _PATH)
peaked = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(peaked)

# A cheaper network than the benchmark's (same layout rules): the test checks the plumbing, not the numbers.
SMALL = {"num_hidden_layers": 2, "num_experts": 8, "num_experts_per_tok": 2, "hidden_size": 64,
         "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 128, "moe_intermediate_size": 32,
         "moe_shared_expert_intermediate_size": 32, "vocab_size": 256}


def test_short_training_writes_a_loadable_trained_checkpoint(tmp_path):
    trained, plain = str(tmp_path / "trained"), str(tmp_path / "plain")
    info = peaked.make_peaked_checkpoint(trained, "cpu", steps=30, seed=1, n_seq=2, seq_len=24, lr=1e-2,
                                         config_overrides=SMALL)
    assert info["final_loss"] < 0.5 * info["initial_loss"]
    assert len(info["expert_load"]) == 1 and sum(info["expert_load"][0]) == 2 * 24 * 2
    # The same folder as the writer makes with the same seed, but other weights (the expert biases aside).
    write_checkpoint(plain, peaked.peaked_config(SMALL), seed=1, std=0.02, head_std=0.02, router_std=0.1,
                     bias_std=0.01)
    a, b = load_file(os.path.join(trained, "model.safetensors")), load_file(os.path.join(plain, "model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)
    assert torch.equal(a["model.layers.1.mlp.gate.expert_bias"], b["model.layers.1.mlp.gate.expert_bias"])
    assert not torch.equal(a["model.layers.1.mlp.experts.3.down_proj.weight"],
                           b["model.layers.1.mlp.experts.3.down_proj.weight"])
    assert sorted(os.listdir(trained)) == sorted(os.listdir(plain))
    # Deterministic on the CPU: the same seed trains the same weights, bit for bit.
    again = str(tmp_path / "again")
    peaked.make_peaked_checkpoint(again, "cpu", steps=30, seed=1, n_seq=2, seq_len=24, lr=1e-2, config_overrides=SMALL)
    c = load_file(os.path.join(again, "model.safetensors"))
    assert all(torch.equal(a[k], c[k]) for k in a)

    # The engine loads it and computes what was trained: teacher-forced accuracy on the corpus, from
    # prompt logprobs, matches the training's own last measurement.
    corpus = info["corpus"]
    llm = LLM(trained, device="cpu", dtype="float32", kv_cache_memory=1 << 26, max_model_len=64)
    outs = llm.generate([row.tolist() for row in corpus],
                        SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0), use_tqdm=False)
    hits = total = 0
    for out, row in zip(outs, corpus.tolist()):
        for pos, entry in enumerate(out.prompt_logprobs[1:], start=1):
            hits += entry[row[pos]].rank == 1
            total += 1
    assert info["final_accuracy"] > 0.5 and abs(hits / total - info["final_accuracy"]) < 0.05
