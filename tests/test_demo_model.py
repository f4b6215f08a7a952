"""The shipped demo model (param2moe/data/param2-demo, scripts/train_demo_model.py) is the default model, has
Param-2's features and tokens, and has learned its language: its perplexity on held-out text, computed by
the engine from prompt logprobs, is far below a unigram model's on the same text."""

from __future__ import annotations

import math
import os

import pytest
import torch

from param2moe import LLM, SamplingParams
from param2moe.config import Param2MoEConfig
from param2moe.engine import EngineConfig
from param2moe.engine.config import default_model_path
from param2moe.tokenizer import Tokenizer
from param2moe.writer import CHAT_TEMPLATE, SPECIAL_TOKENS

HELDOUT = os.path.join(os.path.dirname(__file__), "data", "demo_heldout.txt")  # not trained on: data/demo_heldout.md
MAX_LEN = 512  # tokens of a held-out piece that are scored


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_default_model_is_the_demo_with_param2_features_and_tokens():
    path = EngineConfig().resolve().model
    assert path == default_model_path() and os.path.basename(path) == "param2-demo"
    cfg = Param2MoEConfig.from_pretrained(path)
    assert cfg.use_qk_norm and cfg.tie_word_embeddings and cfg.first_k_dense_replace == 1
    assert cfg.score_function == "sigmoid" and cfg.moe_router_enable_expert_bias and cfg.routed_scaling_factor > 1
    assert cfg.n_group > 1 and 0 < cfg.topk_group < cfg.n_group and cfg.num_shared_experts > 0
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))
    assert size <= 32e6
    tok = Tokenizer(path)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert tok.chat_template == CHAT_TEMPLATE
    assert os.path.exists(os.path.join(path, "README.md"))  # the model card


def test_heldout_perplexity_far_below_unigram():
    llm = LLM(device="cpu", dtype="float32", max_model_len=MAX_LEN + 1, max_num_batched_tokens=4096,
              kv_cache_memory=64 << 20)
    tok = llm.get_tokenizer()
    with open(HELDOUT, encoding="utf-8") as f:
        pieces = [p for p in f.read().split("\n\n") if p.strip()]
    prompts = [tok.encode(p, add_special_tokens=False)[:MAX_LEN] for p in pieces]
    outs = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0), use_tqdm=False)
    nll, scored = 0.0, []
    for ids, out in zip(prompts, outs):
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
        nll -= sum(entry[t].logprob for entry, t in zip(out.prompt_logprobs[1:], ids[1:]))
        scored.extend(ids[1:])
    model_ppl = math.exp(nll / len(scored))
    # Unigram baseline: the held-out text's own token frequencies (add-one smoothed over the vocabulary), a
    # baseline that has seen the answers' frequencies, so beating it is the harder test.
    counts = torch.bincount(torch.tensor(scored), minlength=tok.vocab_size).double() + 1
    unigram_ppl = math.exp(-(counts / counts.sum()).log()[scored].mean().item())
    assert len(pieces) >= 20 and len(scored) > 5_000
    assert model_ppl < 0.5 * unigram_ppl, (model_ppl, unigram_ppl)
