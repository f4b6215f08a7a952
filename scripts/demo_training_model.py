"""The Param2MoE network as a trainable module, batched [B, T], for scripts/train_demo_model.py.

The engine's network (param2moe/model/network.py) is built for inference: flattened tokens, paged KV
caches, fused kernels, parameters without gradients. This module computes the same function (SPEC 3)
on [B, T] batches with autograd, and uses the engine's own plain torch definitions for the parts where
a slip would be silent: RMSNorm (`kernels.norm.rms_norm`), RoPE (`kernels.rope.apply_rope` with the
cos/sin of `model.rope.rope_cos_sin`) and routing (`kernels.routing.route`: sigmoid scores, expert bias
for the choice only, grouped top-k, normalised and scaled weights). `state_dict_hf()` gives the
tensors under the checkpoint's names (`checkpoint.checkpoint_layout`), so the written folder loads in
the engine as it is; train_demo_model.py checks that the engine reproduces this module's logits.

The expert bias is a buffer, not a parameter: no gradient reaches it. `update_expert_bias(u)` applies the
aux-loss-free balancing rule (DeepSeek-V3, BailingMoeV2) from the loads counted in the last forward:
bias_i += u * sign(mean load - load_i), per layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from param2moe.config import Param2MoEConfig
from param2moe.kernels.norm import rms_norm
from param2moe.kernels.rope import apply_rope
from param2moe.kernels.routing import route
from param2moe.model.rope import rope_cos_sin


def _swiglu(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x, w13).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w2)


def _split_swiglu(prefix: str, w13: torch.Tensor, w2: torch.Tensor) -> dict[str, torch.Tensor]:
    gate, up = w13.chunk(2, dim=0)
    return {prefix + "gate_proj.weight": gate, prefix + "up_proj.weight": up, prefix + "down_proj.weight": w2}


class Attention(nn.Module):
    def __init__(self, cfg: Param2MoEConfig, std: float, out_std: float):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_size
        self.nh, self.nkv, self.d, self.eps = cfg.num_attention_heads, cfg.num_kv_heads, d, cfg.rms_norm_eps
        self.qkv = nn.Parameter(torch.randn((self.nh + 2 * self.nkv) * d, h) * std)
        self.dense = nn.Parameter(torch.randn(h, self.nh * d) * out_std)
        self.q_norm = nn.Parameter(torch.ones(d))
        self.k_norm = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = F.linear(x, self.qkv).split([self.nh * self.d, self.nkv * self.d, self.nkv * self.d], dim=-1)
        q = apply_rope(rms_norm(q.reshape(b, t, self.nh, self.d), self.q_norm, self.eps), cos, sin)
        k = apply_rope(rms_norm(k.reshape(b, t, self.nkv, self.d), self.k_norm, self.eps), cos, sin)
        v = v.reshape(b, t, self.nkv, self.d)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                           scale=self.d**-0.5, enable_gqa=True)
        return F.linear(o.transpose(1, 2).reshape(b, t, -1), self.dense)


class MoE(nn.Module):
    def __init__(self, cfg: Param2MoEConfig, std: float, out_std: float):
        super().__init__()
        e, h, im, sh = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size
        self.cfg = cfg
        self.gate = nn.Parameter(torch.randn(e, h) * std)  # fp32 always: routing runs in fp32 (SPEC 3.4)
        self.register_buffer("expert_bias", torch.zeros(e))
        self.w13 = nn.Parameter(torch.randn(e, 2 * im, h) * std)
        self.w2 = nn.Parameter(torch.randn(e, h, im) * out_std)
        self.shared_w13 = nn.Parameter(torch.randn(2 * sh, h) * std)
        self.shared_w2 = nn.Parameter(torch.randn(h, sh) * out_std)
        self.load = torch.zeros(e)  # tokens per expert in the last forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, (n, h) = self.cfg, x.shape
        with torch.autocast(x.device.type, enabled=False):
            weights, ids = route(F.linear(x.float(), self.gate), self.expert_bias, c.num_experts_per_tok,
                                 score_function=c.score_function, n_group=c.n_group, topk_group=c.topk_group,
                                 norm_topk_prob=c.norm_topk_prob, routed_scaling_factor=c.routed_scaling_factor)
        k = ids.shape[1]
        flat = ids.reshape(-1)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=c.num_experts)
        self.load = counts.detach()
        sizes = counts.tolist()
        # The (token, expert) pairs grouped by expert. split and unbind, not slices: their backward is one
        # concatenation, where each slice's would be a zero tensor of the whole size.
        rows = x[order // k].split(sizes)
        outs = [_swiglu(r, w13, w2) for r, w13, w2, m in zip(rows, self.w13.unbind(0), self.w2.unbind(0), sizes) if m]
        inverse = order.argsort()
        pair_out = torch.cat(outs)[inverse].view(n, k, h)  # back in (token, k) order: gathers, no atomics
        y = (pair_out.float() * weights[..., None]).sum(1).to(x.dtype)
        return y + _swiglu(x, self.shared_w13, self.shared_w2)


class Layer(nn.Module):
    def __init__(self, cfg: Param2MoEConfig, index: int, std: float, out_std: float):
        super().__init__()
        h = cfg.hidden_size
        self.in_norm, self.post_norm = nn.Parameter(torch.ones(h)), nn.Parameter(torch.ones(h))
        self.attention = Attention(cfg, std, out_std)
        if cfg.is_dense_layer(index):
            self.moe = None
            self.w13 = nn.Parameter(torch.randn(2 * cfg.intermediate_size, h) * std)
            self.w2 = nn.Parameter(torch.randn(h, cfg.intermediate_size) * out_std)
        else:
            self.moe = MoE(cfg, std, out_std)
        self.eps = cfg.rms_norm_eps

    def forward(self, h: torch.Tensor, cos, sin, dropout: float) -> torch.Tensor:
        h = h + F.dropout(self.attention(rms_norm(h, self.in_norm, self.eps), cos, sin), dropout, self.training)
        x = rms_norm(h, self.post_norm, self.eps)
        y = _swiglu(x, self.w13, self.w2) if self.moe is None else self.moe(x.flatten(0, 1)).view_as(x)
        return h + F.dropout(y, dropout, self.training)


class DemoModel(nn.Module):
    """Param2MoE with tied embeddings. forward(ids [B, T]) -> logits [B, T, V] in float32."""

    def __init__(self, cfg: Param2MoEConfig, dropout: float = 0.0, std: float = 0.02):
        super().__init__()
        if not cfg.tie_word_embeddings or cfg.use_qkv_bias or cfg.use_bias or not cfg.use_qk_norm:
            raise ValueError("DemoModel trains the tied, bias-free, QK-norm layout only")
        self.cfg, self.dropout = cfg, dropout
        out_std = std / math.sqrt(2 * cfg.num_hidden_layers)  # residual branches scaled down with depth
        self.embed = nn.Parameter(torch.randn(cfg.vocab_size, cfg.hidden_size) * std)
        self.layers = nn.ModuleList(Layer(cfg, i, std, out_std) for i in range(cfg.num_hidden_layers))
        self.norm = nn.Parameter(torch.ones(cfg.hidden_size))
        cos, sin = rope_cos_sin(cfg, cfg.max_position_embeddings)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def moes(self) -> list[MoE]:
        return [layer.moe for layer in self.layers if layer.moe is not None]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        cos, sin = self.cos[:t], self.sin[:t]
        h = F.dropout(F.embedding(ids, self.embed), self.dropout, self.training)
        for layer in self.layers:
            h = layer(h, cos, sin, self.dropout)
        h = rms_norm(h, self.norm, self.cfg.rms_norm_eps)
        return F.linear(h, self.embed).float()

    @torch.no_grad()
    def update_expert_bias(self, u: float) -> None:
        """bias_i += u * sign(mean load - load_i) in every MoE layer, from the last forward's loads."""
        for moe in self.moes():
            load = moe.load.float()
            moe.expert_bias.add_(u * torch.sign(load.mean() - load))

    def state_dict_hf(self) -> dict[str, torch.Tensor]:
        """The weights under the checkpoint's names (float32; the caller picks the stored dtypes)."""
        out = {"model.word_embeddings.weight": self.embed, "model.norm.weight": self.norm}
        for i, layer in enumerate(self.layers):
            p, a = f"model.layers.{i}.", layer.attention
            out.update({p + "input_layernorm.weight": layer.in_norm, p + "post_attention_layernorm.weight":
                        layer.post_norm, p + "attention.query_key_value.weight": a.qkv,
                        p + "attention.dense.weight": a.dense, p + "attention.query_layernorm.weight": a.q_norm,
                        p + "attention.key_layernorm.weight": a.k_norm})
            if layer.moe is None:
                out.update(_split_swiglu(p + "mlp.", layer.w13, layer.w2))
                continue
            m = layer.moe
            out[p + "mlp.gate.weight"] = m.gate
            out[p + "mlp.gate.expert_bias"] = m.expert_bias - m.expert_bias.mean()  # centred: the same choices
            for e in range(m.w13.shape[0]):
                out.update(_split_swiglu(f"{p}mlp.experts.{e}.", m.w13[e], m.w2[e]))
            out.update(_split_swiglu(p + "mlp.shared_experts.", m.shared_w13, m.shared_w2))
        return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}

    @torch.no_grad()
    def load_hf(self, tensors: dict[str, torch.Tensor]) -> None:
        """The inverse of state_dict_hf (tests and the engine-parity check read written weights back)."""
        mine = self.state_dict_hf()
        if mine.keys() != tensors.keys():
            raise KeyError(f"tensor names differ: {sorted(mine.keys() ^ tensors.keys())[:5]}")
        self.embed.copy_(tensors["model.word_embeddings.weight"])
        self.norm.copy_(tensors["model.norm.weight"])
        for i, layer in enumerate(self.layers):
            p, a = f"model.layers.{i}.", layer.attention
            for dest, name in ((layer.in_norm, "input_layernorm"), (layer.post_norm, "post_attention_layernorm"),
                               (a.qkv, "attention.query_key_value"), (a.dense, "attention.dense"),
                               (a.q_norm, "attention.query_layernorm"), (a.k_norm, "attention.key_layernorm")):
                dest.copy_(tensors[f"{p}{name}.weight"])
            pairs = [(p + "mlp.", layer.w13, layer.w2)] if layer.moe is None else [
                *((f"{p}mlp.experts.{e}.", layer.moe.w13[e], layer.moe.w2[e]) for e in range(layer.moe.w13.shape[0])),
                (p + "mlp.shared_experts.", layer.moe.shared_w13, layer.moe.shared_w2)]
            for prefix, w13, w2 in pairs:
                w13.copy_(torch.cat([tensors[prefix + "gate_proj.weight"], tensors[prefix + "up_proj.weight"]]))
                w2.copy_(tensors[prefix + "down_proj.weight"])
            if layer.moe is not None:
                layer.moe.gate.copy_(tensors[p + "mlp.gate.weight"])
                layer.moe.expert_bias.copy_(tensors[p + "mlp.gate.expert_bias"])
