"""A decoder layer as the fused CPU decode step reads it (kernels/cpu/layer.py LayerWeights), or None where that
step would not compute what the per-op forward (network.py DecoderLayer.forward) computes:

- more than one rank (TP / EP: partial sums and all-reduces);
- LoRA slots attached to any of the layer's projections (the per-op path adds their deltas, and runs an MLP with
  hooks as separate linears);
- expert load balancing (EPLB: an expert map sends each token to a physical replica and counts the load);
- a shared expert folded into the routed experts, or uniformly random routing (benchmarks) replacing the router.

Weight formats the C code does not take (fp8, odd int4 groups), biases and dtypes are checked by layer.py.
"""

from __future__ import annotations

from ..kernels.cpu.layer import LayerWeights


def _declines(att, mlp) -> bool:
    """What may change after a layer's first decode step (plain attributes, cheap to read): LoRA hooks, an expert
    map, random routing (set each step by benchmarks), a folded shared expert."""
    a, m = att.__dict__, mlp.__dict__  # (plain attributes live here; a missing one costs an exception otherwise)
    shared = mlp._modules.get("shared_experts")
    hooks = (a["lora_qkv"], a["lora_dense"], m.get("lora_gate_up"), m.get("lora_down"), m.get("lora_experts"),
             *((None, None) if shared is None else (shared.__dict__["lora_gate_up"], shared.__dict__["lora_down"])))
    return (any(h is not None for h in hooks) or m.get("random_choice") is not None or m.get("expert_map") is not None
            or bool(m.get("num_folded_shared")))


def native_weights(layer) -> LayerWeights | None:
    """layer: a network.DecoderLayer. The description is built at the first call and kept on the layer (reading a
    module's parameters costs microseconds each, every layer and step otherwise); code that replaces the layer's
    tensors afterwards calls `forget_native_weights(layer)`."""
    cached = layer.__dict__.get("_native_weights")
    if cached is None:
        cached = layer.__dict__["_native_weights"] = (layer.attention, layer.mlp, _describe(layer))
    att, mlp, lw = cached
    return None if _declines(att, mlp) else lw


def forget_native_weights(layer) -> None:
    layer.__dict__.pop("_native_weights", None)


def _describe(layer) -> LayerWeights | None:
    att, mlp = layer.attention, layer.mlp
    if att.shard.tp_size > 1 or att.shard.ep_size > 1:
        return None
    qn, kn = att.query_layernorm, att.key_layernorm
    lw = LayerWeights(
        hidden=layer.input_layernorm.weight.shape[0], heads=att.num_heads, kv_heads=att.num_kv_heads,
        head_dim=att.head_dim, eps=layer.input_layernorm.eps, attn_scale=att.scale,
        in_norm=layer.input_layernorm.weight, post_norm=layer.post_attention_layernorm.weight,
        qkv=att.query_key_value.weight, dense=att.dense.weight, q_norm=None if qn is None else qn.weight,
        k_norm=None if kn is None else kn.weight, qk_eps=0.0 if qn is None else qn.eps,
        biases=att.query_key_value.bias is not None or att.dense.bias is not None)
    if not hasattr(mlp, "w13"):  # a dense layer's MLP
        lw.mlp_gate_up, lw.mlp_down = mlp.gate_up_proj, mlp.down_proj
        return lw
    c = mlp.cfg
    lw.router, lw.router_bias, lw.w13, lw.w2 = mlp.gate.weight, mlp.gate.expert_bias, mlp.w13, mlp.w2
    lw.top_k, lw.score_function, lw.n_group, lw.topk_group = c.num_experts_per_tok, c.score_function, c.n_group, \
        c.topk_group
    lw.norm_topk_prob, lw.routed_scaling_factor = c.norm_topk_prob, c.routed_scaling_factor
    if mlp.shared_experts is not None:
        lw.mlp_gate_up, lw.mlp_down = mlp.shared_experts.gate_up_proj, mlp.shared_experts.down_proj
    return lw
