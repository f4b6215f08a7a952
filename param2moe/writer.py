"""Write a complete Hugging Face checkpoint directory with random weights, from a preset config.

`param2moe make-checkpoint OUT --preset tiny|small|param2-17b [--set key=value ...] [--seed N]`.
The folder holds config.json, generation_config.json, safetensors weights under the Hugging Face
names (sharded when large), tokenizer.json with Param2's special tokens (docs/model.md §5), tokenizer_config.json
with a chat template, and a short `configuration_param2moe.py` so that vLLM can read the folder.
Same preset, settings and seed: the same weights, bit for bit.
"""

from __future__ import annotations

import json
import os

import torch

from .checkpoint import checkpoint_layout
from .config import Param2MoEConfig
from .engine.config import PRESETS, preset_config  # noqa: F401  (the writer's presets)

SPECIAL_TOKENS = [
    "<<|PAD|>>", "<<|UNK|>>", "<<|BOS|>>", "<<|EOS|>>",
    *[f"<<|reserved_{i}|>>" for i in range(4, 10)],
    "<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>",
    "<|im_start|>", "<|im_end|>", "<tools>", "</tools>",
]

# Special tokens that decoded text keeps (reasoning and tool-call markup), like Param2's tokenizer.
TEXT_MARKUP = {"<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
               "<tools>", "</tools>"}

# Hermes-style tools, reasoning in <think>...</think> (docs/model.md §5), ChatML turns.
CHAT_TEMPLATE = """\
{%- set sys = messages[0].content if messages and messages[0].role == 'system' else none %}
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if sys %}{{- sys + '\\n\\n' }}{% endif %}
    {{- 'You may call one or more functions. Their signatures:\\n<tools>\\n' }}
    {%- for tool in tools %}{{- tool | tojson }}{{- '\\n' }}{%- endfor %}
    {{- '</tools>\\nTo call a function, write <tool_call>{"name": <name>, "arguments": <arguments>}</tool_call>.<|im_end|>\\n' }}
{%- elif sys is not none %}
    {{- '<|im_start|>system\\n' + sys + '<|im_end|>\\n' }}
{%- endif %}
{%- for m in messages %}
    {%- if m.role == 'system' and loop.first %}
    {%- elif m.role == 'assistant' %}
        {{- '<|im_start|>assistant\\n' + (m.content or '') }}
        {%- for tc in m.tool_calls or [] %}
            {%- set f = tc.function if tc.function is defined else tc %}
            {{- '<tool_call>{"name": ' + (f.name | tojson) + ', "arguments": ' }}
            {{- f.arguments if f.arguments is string else f.arguments | tojson }}
            {{- '}</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif m.role == 'tool' %}
        {{- '<|im_start|>user\\n<tool_response>' + m.content + '</tool_response><|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and not enable_thinking %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}
{%- endif %}
"""

# vLLM reads the folder with trust_remote_code and this class; param2moe itself never needs it.
CONFIGURATION_PY = '''"""Param2MoE config class for tools that need one (written by param2moe make-checkpoint)."""
from transformers import PretrainedConfig


class Param2MoEConfig(PretrainedConfig):
    model_type = "param2moe"

    def __init__(self, **kwargs):
        defaults = dict(num_key_value_heads=None, head_dim=None, use_qk_norm=False, use_qkv_bias=False,
                        use_bias=False, rope_theta=10000.0, partial_rotary_factor=1.0, rope_scaling=None,
                        max_position_embeddings=4096, rms_norm_eps=1e-6, hidden_act="silu", num_experts=None,
                        num_experts_per_tok=None, moe_intermediate_size=None, first_k_dense_replace=1,
                        num_shared_experts=1, moe_shared_expert_intermediate_size=None, n_group=None,
                        topk_group=None, score_function="sigmoid", moe_router_enable_expert_bias=True,
                        routed_scaling_factor=1.0, norm_topk_prob=True, router_dtype="fp32",
                        num_nextn_predict_layers=0)
        for key, value in defaults.items():
            setattr(self, key, kwargs.pop(key, value))
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            setattr(self, key, kwargs.pop(key, None))
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        super().__init__(**kwargs)
'''

_CORPUS = """\
Param2 is a mixture of experts language model. Each token is sent to a few experts chosen by a router.
The router scores every expert with a sigmoid, adds a bias to balance the load, and keeps the best six.
Shared experts see every token. Attention uses grouped queries: many query heads share a key and value head.
The engine keeps keys and values in a paged cache, schedules requests in batches, and streams tokens.
India is a land of many languages: Hindi, Bengali, Telugu, Marathi, Tamil, Urdu, Gujarati, Kannada,
Odia, Malayalam, Punjabi, Assamese and Sanskrit among them. The river flows to the sea; the monsoon
brings rain to the fields, and farmers sow rice, wheat, cotton and sugarcane.
def add(a, b):
    return a + b
for i in range(10):
    print(i, i * i)
The quick brown fox jumps over the lazy dog. One, two, three, four, five, six, seven, eight, nine, ten.
Questions and answers: What is the capital of India? New Delhi. How many days are in a week? Seven.
The user asks a question and the assistant thinks first, then answers. When a tool helps, the assistant
calls it with a name and JSON arguments, reads the result, and writes the final answer.
{"name": "get_weather", "arguments": {"city": "Mumbai", "unit": "celsius"}}
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 2025 2026. Punctuation: , . ; : ! ? ( ) [ ] { } " ' - _ / \\
"""


def build_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer with Param2's special tokens at ids 0..24, trained on a fixed text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS.splitlines() * 4, trainer)
    return tok


def parse_overrides(items: list[str]) -> dict:
    """`key=value` strings; values are read as JSON when they parse (numbers, true, null, dicts)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key=value")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _random_tensor(name: str, shape, gen: torch.Generator, std: float, head_std: float,
                   router_std: float = 0.5, bias_std: float = 0.01) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if name.endswith("expert_bias"):
        return bias_std * torch.randn(shape, generator=gen)
    if name.endswith("bias"):
        return std * torch.randn(shape, generator=gen)
    if name in ("model.word_embeddings.weight", "lm_head.weight"):
        return head_std * torch.randn(shape, generator=gen)
    if name.endswith("mlp.gate.weight"):  # a router strong enough that tokens do not all pick the same experts
        return router_std * torch.randn(shape, generator=gen)
    return std * torch.randn(shape, generator=gen)


def write_checkpoint(out_dir: str, config: Param2MoEConfig, seed: int = 0, *, std: float | None = None,
                     head_std: float = 0.5, router_std: float = 0.5, bias_std: float = 0.01,
                     shard_bytes: int = 2 << 30,
                     router_dtype: str | None = None) -> None:
    """Write the folder. `head_std` scales the embedding (the tied head too) so that next-token
    distributions are peaked rather than flat, as a trained model's are; router weights and expert
    biases are stored in `router_dtype` (default: the config's torch_dtype). The default `std` makes
    each layer's output comparable to the embedding, so that outputs depend on the whole context."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    std = std if std is not None else 1.7 / config.hidden_size**0.5
    dtype = getattr(torch, config.torch_dtype)
    rdtype = getattr(torch, router_dtype) if router_dtype else dtype
    gen = torch.Generator().manual_seed(seed)
    layout = checkpoint_layout(config)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, shape in layout.items():
        is_router = name.endswith(("mlp.gate.weight", "mlp.gate.expert_bias"))
        t = _random_tensor(name, shape, gen, std, head_std, router_std, bias_std).to(rdtype if is_router else dtype)
        nbytes = t.numel() * t.element_size()
        if size and size + nbytes > shard_bytes:
            _flush(shards, out_dir, save_file)
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    _flush(shards, out_dir, save_file, last=True)
    write_folder_files(out_dir, config)


def write_folder_files(out_dir: str, config: Param2MoEConfig, tokenizer=None) -> None:
    """Everything of a checkpoint folder but the weights: config.json, generation_config.json,
    configuration_param2moe.py, and the tokenizer files (`tokenizer`: a trained `tokenizers.Tokenizer`
    with SPECIAL_TOKENS at ids 0..24; default: one trained on a fixed text for the vocabulary size)."""
    os.makedirs(out_dir, exist_ok=True)
    cfg = {k: v for k, v in config.to_dict().items()}
    cfg["auto_map"] = {"AutoConfig": "configuration_param2moe.Param2MoEConfig"}
    _write_json(os.path.join(out_dir, "config.json"), cfg)
    _write_json(os.path.join(out_dir, "generation_config.json"), {
        # The chat's end of turn (<|im_end|>, id 22) ends generation too.
        "bos_token_id": config.bos_token_id, "eos_token_id": [*config.eos_token_ids, 22],
        "pad_token_id": config.pad_token_id, "do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 50})
    with open(os.path.join(out_dir, "configuration_param2moe.py"), "w") as f:
        f.write(CONFIGURATION_PY)
    write_tokenizer(out_dir, config.vocab_size, config.max_position_embeddings, tokenizer)


def write_tokenizer(out_dir: str, vocab_size: int, max_len: int, tok=None) -> None:
    tok = tok or build_tokenizer(min(vocab_size, 30000))
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    if ids != list(range(len(SPECIAL_TOKENS))):
        raise ValueError(f"the tokenizer's special tokens are not at ids 0..{len(SPECIAL_TOKENS) - 1}: {ids}")
    data = json.loads(tok.to_str())
    for added in data["added_tokens"]:  # markup the parsers read stays in decoded text
        added["special"] = added["content"] not in TEXT_MARKUP
    _write_json(os.path.join(out_dir, "tokenizer.json"), data)
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<<|BOS|>>", "eos_token": "<<|EOS|>>",
        "pad_token": "<<|PAD|>>", "unk_token": "<<|UNK|>>", "add_bos_token": False, "add_eos_token": False,
        "model_max_length": max_len, "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE})


def _flush(shards, out_dir, save_file, last: bool = False) -> None:
    """Write the newest shard; at the end, name the shards model-0000k-of-0000n and write the index."""
    n = len(shards)
    if not last:
        save_file(shards[-1], os.path.join(out_dir, f".shard-{n}.tmp"), metadata={"format": "pt"})
        shards[-1] = {name: None for name in shards[-1]}  # free the tensors, keep the names
        return
    if n == 1:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        return
    save_file(shards[-1], os.path.join(out_dir, f".shard-{n}.tmp"), metadata={"format": "pt"})
    weight_map = {}
    for k in range(1, n + 1):
        final = f"model-{k:05d}-of-{n:05d}.safetensors"
        os.replace(os.path.join(out_dir, f".shard-{k}.tmp"), os.path.join(out_dir, final))
        weight_map.update({name: final for name in shards[k - 1]})
    _write_json(os.path.join(out_dir, "model.safetensors.index.json"),
                {"metadata": {}, "weight_map": weight_map})


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
