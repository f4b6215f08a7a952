"""`Param2MoEForCausalLM` as a transformers `PreTrainedModel`: to fine-tune (adapters with PEFT, or
the whole model) and to `generate`, with the module and tensor names of the Hub checkpoint, so that
`LoraConfig(target_modules=["query_key_value", "dense", "gate_proj", "up_proj", "down_proj"])` trains
exactly the modules the engine serves adapters for (param2moe/lora/).

Needs the `lora` extra (transformers, peft). Importing this module registers the classes with
AutoConfig and AutoModelForCausalLM under model types param2moe and bailing_moe_v2, no remote code;
a transformers release that defines a model type itself keeps its own class there (transformers
5.2x maps param2moe onto its GLM-4-MoE code, whose module names differ): use this class directly.

Plain eager PyTorch, differentiable: routed experts run one at a time over their tokens, attention
is SDPA over a boolean mask built from attention_mask (left padding works), the KV cache is
transformers' own. The math is the engine's plain torch ops (RMSNorm in fp32, RoPE tables, routing:
param2moe.kernels); the tests hold the two within 1e-4 in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .config import Param2MoEConfig
from .hf_compat import CONFIG_CLASSES
from .hf_compat import register as _register_configs
from .kernels.norm import rms_norm
from .kernels.rope import apply_rope
from .kernels.routing import route
from .model.rope import rope_cos_sin

_register_configs()
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def engine_config(config) -> Param2MoEConfig:
    """Our dataclass (one source of the keys, defaults and derived values) from a transformers config."""
    known = set(Param2MoEConfig.__dataclass_fields__) | {"rope_parameters"}
    return Param2MoEConfig.from_dict({k: v for k, v in config.to_dict().items() if k in known})


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class MLP(nn.Module):
    """SwiGLU down(silu(gate(x)) * up(x)); also each expert and the (fused) shared expert."""

    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    def __init__(self, experts: int, hidden: int, with_bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, hidden))
        # expert_bias balances load outside of training by gradients (SPEC 3.4): a buffer, saved with the model
        self.register_buffer("expert_bias", torch.zeros(experts) if with_bias else None)


class MoE(nn.Module):
    def __init__(self, cfg: Param2MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Router(cfg.num_experts, cfg.hidden_size, cfg.moe_router_enable_expert_bias)
        self.experts = nn.ModuleList(MLP(cfg.hidden_size, cfg.moe_intermediate_size) for _ in range(cfg.num_experts))
        shared = cfg.shared_expert_intermediate_size
        self.shared_experts = MLP(cfg.hidden_size, shared) if shared else None

    def forward(self, x):
        c, shape = self.cfg, x.shape
        x = x.reshape(-1, shape[-1])
        weights, ids = route(F.linear(x.float(), self.gate.weight.float()), self.gate.expert_bias,
                             c.num_experts_per_tok, score_function=c.score_function, n_group=c.n_group,
                             topk_group=c.topk_group, norm_topk_prob=c.norm_topk_prob,
                             routed_scaling_factor=c.routed_scaling_factor)
        y = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        for e in torch.unique(ids).tolist():  # each expert once, over the tokens that chose it
            rows, k = (ids == e).nonzero(as_tuple=True)
            y = y.index_add(0, rows, self.experts[e](x[rows]).float() * weights[rows, k, None])
        y = y.to(x.dtype)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.reshape(shape)


class Attention(nn.Module):
    def __init__(self, cfg: Param2MoEConfig, layer_idx: int):
        super().__init__()
        self.layer_idx, d, h = layer_idx, cfg.head_size, cfg.hidden_size
        self.nh, self.nkv, self.d = cfg.num_attention_heads, cfg.num_kv_heads, d
        self.query_key_value = nn.Linear(h, (self.nh + 2 * self.nkv) * d, bias=cfg.use_qkv_bias)
        self.dense = nn.Linear(self.nh * d, h, bias=cfg.use_bias)
        self.query_layernorm = RMSNorm(d, cfg.rms_norm_eps) if cfg.use_qk_norm else None
        self.key_layernorm = RMSNorm(d, cfg.rms_norm_eps) if cfg.use_qk_norm else None

    def forward(self, x, cos, sin, mask, cache):
        b, t, _ = x.shape
        d = self.d
        q, k, v = self.query_key_value(x).split([self.nh * d, self.nkv * d, self.nkv * d], dim=-1)
        q, k, v = q.reshape(b * t, self.nh, d), k.reshape(b * t, self.nkv, d), v.reshape(b, t, self.nkv, d)
        if self.query_layernorm is not None:
            q, k = self.query_layernorm(q), self.key_layernorm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k = q.reshape(b, t, self.nh, d).transpose(1, 2), k.reshape(b, t, self.nkv, d).transpose(1, 2)
        v = v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        group = self.nh // self.nkv
        o = F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                           attn_mask=mask, scale=d**-0.5)
        return self.dense(o.transpose(1, 2).reshape(b, t, self.nh * d))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Param2MoEConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attention = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size) if cfg.is_dense_layer(layer_idx) else MoE(cfg)

    def forward(self, h, cos, sin, mask, cache=None):
        h = h + self.attention(self.input_layernorm(h), cos, sin, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


def _mask(attention_mask, b: int, t: int, past: int, device) -> torch.Tensor:
    """[B, 1, T, past + T] bool: key j visible to query i when j <= past + i and attention_mask[j] is set;
    each query sees itself too, so that a padding row is not all masked (its output is never used)."""
    keys = torch.arange(past + t, device=device)
    queries = torch.arange(past, past + t, device=device)
    mask = (keys[None, :] <= queries[:, None])[None].expand(b, t, past + t)
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, -(past + t):].bool()
    return (mask | (keys[None, :] == queries[:, None]))[:, None]


class Param2MoEPreTrainedModel(PreTrainedModel):
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module):
        std = getattr(self.config, "initializer_range", 0.02)
        with torch.no_grad():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, Router):
                module.weight.normal_(0.0, std)
                if module.expert_bias is not None:
                    module.expert_bias.zero_()


class Param2MoEModel(Param2MoEPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        cfg = self.p2m = engine_config(config)
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gradient_checkpointing = False
        self._rope = None  # (cos, sin) tables on the device, made on first use (not buffers: nothing to load)
        self.post_init()

    def get_input_embeddings(self):
        return self.word_embeddings

    def set_input_embeddings(self, value):
        self.word_embeddings = value

    def _rope_rows(self, positions):
        if self._rope is None or self._rope[0].device != positions.device or \
                self._rope[0].shape[0] <= int(positions.max()):
            n = max(self.p2m.max_position_embeddings, int(positions.max()) + 1)
            self._rope = rope_cos_sin(self.p2m, n, positions.device)
        flat = positions.reshape(-1)
        return self._rope[0][flat], self._rope[1][flat]

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None):
        h = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        b, t = h.shape[:2]
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        if use_cache and cache is None and not checkpointing:
            cache = transformers.DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            if attention_mask is not None:  # left padding: positions count the real tokens
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -t:]
            else:
                position_ids = torch.arange(past, past + t, device=h.device).expand(b, t)
        cos, sin = self._rope_rows(position_ids)
        mask = _mask(attention_mask, b, t, past, h.device)
        for layer in self.layers:
            if checkpointing:
                h = self._gradient_checkpointing_func(layer.__call__, h, cos, sin, mask)
            else:
                h = layer(h, cos, sin, mask, cache)
        return self.norm(h), cache


class Param2MoEForCausalLM(Param2MoEPreTrainedModel, GenerationMixin):
    config_class = CONFIG_CLASSES["param2moe"]
    _tied_weights_keys = {"lm_head.weight": "model.word_embeddings.weight"} \
        if int(transformers.__version__.split(".")[0]) >= 5 else ["lm_head.weight"]

    def __init__(self, config):
        super().__init__(config)
        self.model = Param2MoEModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.word_embeddings

    def set_input_embeddings(self, value):
        self.model.word_embeddings = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep: int = 0, past_key_values=None, **kwargs):
        """Logits (float32) and, with labels, the mean next-token cross entropy (labels -100 ignored)."""
        cache = cache if cache is not None else past_key_values
        hidden, cache = self.model(input_ids, attention_mask, position_ids, cache, inputs_embeds, use_cache)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})


class BailingMoeV2ForCausalLM(Param2MoEForCausalLM):
    config_class = CONFIG_CLASSES["bailing_moe_v2"]


for _cls in (Param2MoEForCausalLM, BailingMoeV2ForCausalLM):
    try:
        AutoModelForCausalLM.register(_cls.config_class, _cls)
    except ValueError:  # registered already (the module imported twice under two names)
        pass
