"""Param2MoE config class for tools that need one (written by param2moe make-checkpoint)."""
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
