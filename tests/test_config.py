"""Param2MoEConfig against docs/model.md §1 and §2: model types, defaults, derived values, rope dicts,
and validation errors that name the key and the rule."""

from __future__ import annotations

import json

import pytest

from param2moe.config import ConfigError, Param2MoEConfig

# The released model's config.json (docs/model.md §1), as the Hub ships it.
PARAM2 = dict(
    model_type="param2moe", architectures=["Param2MoEForCausalLM"],
    vocab_size=128008, hidden_size=2048, num_hidden_layers=21, num_attention_heads=32, num_key_value_heads=8,
    head_dim=64, intermediate_size=9216, moe_intermediate_size=2048, num_experts=64, num_experts_per_tok=6,
    num_shared_experts=2, moe_shared_expert_intermediate_size=4096, first_k_dense_replace=1, n_group=1,
    topk_group=1, score_function="sigmoid", routed_scaling_factor=2.5, norm_topk_prob=True,
    moe_router_enable_expert_bias=True, router_dtype="fp32", use_qk_norm=True, use_qkv_bias=False,
    use_bias=False, tie_word_embeddings=True, rope_theta=1e6, partial_rotary_factor=1.0, rope_scaling=None,
    max_position_embeddings=4096, rms_norm_eps=1e-6, num_nextn_predict_layers=0, torch_dtype="bfloat16",
    bos_token_id=2, eos_token_id=3, pad_token_id=0, hidden_act="silu",
)

# The fewest keys a config can have: only the required shape keys (every layer dense).
MINIMAL = dict(model_type="param2moe", vocab_size=1000, hidden_size=96, num_hidden_layers=4,
               num_attention_heads=6, intermediate_size=256)

MOE = dict(MINIMAL, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)


def make(base: dict, **changes) -> Param2MoEConfig:
    raw = dict(base)
    for key, value in changes.items():
        if value is _ABSENT:
            raw.pop(key, None)
        else:
            raw[key] = value
    return Param2MoEConfig.from_dict(raw)


_ABSENT = object()


# ------------------------------------------------------------------------------------ model types
@pytest.mark.parametrize("model_type", ["param2moe", "bailing_moe_v2"])
def test_both_model_types_read_the_released_config(model_type):
    arch = "Param2MoEForCausalLM" if model_type == "param2moe" else "BailingMoeV2ForCausalLM"
    cfg = make(PARAM2, model_type=model_type, architectures=[arch])
    assert cfg.model_type == model_type
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == (128008, 2048, 21)
    assert (cfg.num_attention_heads, cfg.num_kv_heads, cfg.head_size, cfg.rotary_dim) == (32, 8, 64, 64)
    assert cfg.rope_theta == 1e6
    assert cfg.rope_params["rope_type"] == "default"
    assert cfg.is_moe and cfg.num_experts == 64 and cfg.num_experts_per_tok == 6
    assert cfg.is_dense_layer(0) and not any(cfg.is_dense_layer(i) for i in range(1, 21))
    assert cfg.shared_expert_intermediate_size == 4096  # the total, not 2 * 4096
    assert cfg.routed_scaling_factor == 2.5 and cfg.norm_topk_prob is True
    assert cfg.tie_word_embeddings is True and cfg.use_qk_norm is True
    assert cfg.eos_token_ids == [3] and cfg.bos_token_id == 2 and cfg.pad_token_id == 0


def test_unknown_model_type_is_an_error():
    with pytest.raises(ConfigError, match=r"model_type.*'llama'.*not supported"):
        make(PARAM2, model_type="llama")
    with pytest.raises(ConfigError, match="model_type"):
        make(PARAM2, model_type=_ABSENT)


def test_from_pretrained_reads_the_file_and_names_it_in_errors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dict(PARAM2, model_type="bailing_moe_v2")))
    cfg = Param2MoEConfig.from_pretrained(tmp_path)
    assert cfg.model_type == "bailing_moe_v2" and cfg.num_experts == 64
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(dict(PARAM2, hidden_act="gelu")))
    with pytest.raises(ConfigError, match=r"bad[/\\]config\.json.*hidden_act"):
        Param2MoEConfig.from_pretrained(bad)


# ------------------------------------------------------------------------------------ defaults
def test_section2_defaults_when_keys_are_absent():
    cfg = make(MINIMAL)
    assert cfg.head_size == 96 // 6
    assert cfg.num_kv_heads == 6
    assert cfg.hidden_act == "silu"
    assert cfg.use_qk_norm is False and cfg.use_qkv_bias is False and cfg.use_bias is False
    assert cfg.rope_theta == 10000
    assert cfg.partial_rotary_factor == 1.0 and cfg.rotary_dim == 16
    assert cfg.rope_scaling is None and cfg.rope_params["rope_type"] == "default"
    # num_experts absent (null): every layer is dense.
    assert cfg.num_experts is None and not cfg.is_moe
    assert all(cfg.is_dense_layer(i) for i in range(4))
    assert cfg.shared_expert_intermediate_size == 0
    assert cfg.num_nextn_predict_layers == 0


def test_section2_moe_defaults_when_keys_are_absent():
    cfg = make(MOE)
    assert cfg.first_k_dense_replace == 1
    assert cfg.is_dense_layer(0) and not cfg.is_dense_layer(1) and not cfg.is_dense_layer(3)
    assert cfg.num_shared_experts == 1
    assert cfg.moe_shared_expert_intermediate_size is None
    assert cfg.shared_expert_intermediate_size == 32  # moe_intermediate_size * 1 shared expert
    assert cfg.n_group is None and cfg.topk_group is None and not cfg.grouped_routing
    assert cfg.score_function == "sigmoid"
    assert cfg.moe_router_enable_expert_bias is True
    assert cfg.routed_scaling_factor == 1.0
    assert cfg.norm_topk_prob is True
    assert cfg.router_dtype == "fp32"


def test_explicit_nulls_mean_the_same_as_absent():
    cfg = make(MOE, head_dim=None, num_key_value_heads=None, rope_scaling=None)
    assert cfg.head_size == 16 and cfg.num_kv_heads == 6 and cfg.rope_params["rope_type"] == "default"
    assert not make(MOE, num_experts=None).is_moe


# ------------------------------------------------------------------------------------ derived values
def test_head_dim_given_overrides_hidden_over_heads():
    cfg = make(MINIMAL, head_dim=32)
    assert cfg.head_size == 32
    assert make(MINIMAL, hidden_size=100, num_attention_heads=5).head_size == 20


@pytest.mark.parametrize("factor, head_dim, expected", [(1.0, 64, 64), (0.5, 64, 32), (0.25, 128, 32),
                                                        (0.5, 32, 16)])
def test_rotary_dim_follows_partial_rotary_factor(factor, head_dim, expected):
    assert make(MINIMAL, head_dim=head_dim, partial_rotary_factor=factor).rotary_dim == expected


@pytest.mark.parametrize("k", [0, 1, 3, 4])
def test_dense_layers_from_first_k_dense_replace(k):
    cfg = make(MOE, first_k_dense_replace=k)
    assert [cfg.is_dense_layer(i) for i in range(4)] == [i < k for i in range(4)]


def test_num_experts_null_makes_every_layer_dense_whatever_first_k():
    cfg = make(MOE, num_experts=None, first_k_dense_replace=0)
    assert all(cfg.is_dense_layer(i) for i in range(4))


def test_shared_width_is_the_total_when_given():
    # Param2: 2 shared experts, moe_shared_expert_intermediate_size 4096 is the TOTAL (not 8192).
    cfg = make(MOE, num_shared_experts=2, moe_shared_expert_intermediate_size=48)
    assert cfg.shared_expert_intermediate_size == 48


def test_shared_width_multiplies_when_absent():
    assert make(MOE, num_shared_experts=3).shared_expert_intermediate_size == 3 * 32


def test_no_shared_experts_means_width_zero():
    assert make(MOE, num_shared_experts=0).shared_expert_intermediate_size == 0
    assert make(MOE, num_shared_experts=0, moe_shared_expert_intermediate_size=64).shared_expert_intermediate_size == 0


# ------------------------------------------------------------------------------------ rope dicts
def test_rope_parameters_may_carry_rope_theta():
    cfg = make(MINIMAL, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_params["rope_type"] == "default"
    assert "rope_theta" not in cfg.rope_params


def test_rope_parameters_carry_a_scaling_type():
    cfg = make(MINIMAL, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6,
                                         "original_max_position_embeddings": 1024})
    assert cfg.rope_theta == 1e6
    p = cfg.rope_params
    assert p["rope_type"] == "yarn" and p["factor"] == 4.0 and p["original_max_position_embeddings"] == 1024


def test_rope_parameters_with_legacy_type_key():
    cfg = make(MINIMAL, rope_parameters={"type": "linear", "factor": 2.0})
    assert cfg.rope_params["rope_type"] == "linear" and cfg.rope_params["factor"] == 2.0


def test_rope_scaling_legacy_type_key():
    cfg = make(MINIMAL, rope_scaling={"type": "dynamic", "factor": 2.0})
    assert cfg.rope_params["rope_type"] == "dynamic"
    assert cfg.rope_params["factor"] == 2.0


def test_rope_scaling_rope_type_key():
    cfg = make(MINIMAL, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    assert cfg.rope_params["rope_type"] == "llama3" and cfg.rope_params["factor"] == 8.0


@pytest.mark.parametrize("where", ["rope_scaling", "rope_parameters"])
@pytest.mark.parametrize("type_key", ["rope_type", "type"])
def test_unknown_rope_type_is_an_error(where, type_key):
    with pytest.raises(ConfigError, match=r"rope.*'longrope'.*unknown rope type"):
        make(MINIMAL, **{where: {type_key: "longrope", "factor": 2.0}})


# ------------------------------------------------------------------------------------ validation
def test_hidden_not_divisible_by_heads():
    with pytest.raises(ConfigError, match=r"hidden_size=100.*divisible by num_attention_heads"):
        make(MINIMAL, hidden_size=100, num_attention_heads=6)
    # An explicit head_dim makes the division unnecessary.
    assert make(MINIMAL, hidden_size=100, num_attention_heads=6, head_dim=16).head_size == 16


def test_kv_heads_must_divide_heads():
    with pytest.raises(ConfigError, match=r"num_key_value_heads=4.*divide num_attention_heads"):
        make(MINIMAL, num_key_value_heads=4)
    assert make(MINIMAL, num_key_value_heads=3).num_kv_heads == 3


def test_n_group_must_divide_experts():
    with pytest.raises(ConfigError, match=r"n_group=3.*divide num_experts"):
        make(MOE, n_group=3, topk_group=1)


def test_topk_group_at_most_n_group():
    with pytest.raises(ConfigError, match=r"topk_group=5.*n_group=4"):
        make(MOE, n_group=4, topk_group=5)


def test_top_k_too_large_for_the_kept_groups():
    # 8 experts in 4 groups of 2; keeping 1 group leaves 2 experts, fewer than top_k 3.
    with pytest.raises(ConfigError, match=r"num_experts_per_tok=3.*topk_group \* experts per group"):
        make(MOE, num_experts_per_tok=3, n_group=4, topk_group=1)
    assert make(MOE, num_experts_per_tok=4, n_group=4, topk_group=2).grouped_routing


@pytest.mark.parametrize("present", [{"n_group": 2}, {"topk_group": 1}])
def test_only_one_of_n_group_topk_group(present):
    with pytest.raises(ConfigError, match=r"n_group.*topk_group.*together"):
        make(MOE, **present)


def test_hidden_act_must_be_silu():
    with pytest.raises(ConfigError, match=r"hidden_act='gelu'.*silu"):
        make(MINIMAL, hidden_act="gelu")


@pytest.mark.parametrize("key", ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                 "intermediate_size"])
def test_missing_required_key(key):
    with pytest.raises(ConfigError, match=rf"missing.*{key}"):
        make(MINIMAL, **{key: _ABSENT})


def test_bad_score_function():
    with pytest.raises(ConfigError, match=r"score_function='relu'.*sigmoid.*softmax"):
        make(MOE, score_function="relu")
    assert make(MOE, score_function="softmax").score_function == "softmax"


def test_moe_needs_top_k_and_expert_width():
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        make(MOE, num_experts_per_tok=_ABSENT)
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        make(MOE, num_experts_per_tok=9)
    with pytest.raises(ConfigError, match="moe_intermediate_size"):
        make(MOE, moe_intermediate_size=_ABSENT)


def test_scaled_rope_needs_a_factor():
    with pytest.raises(ConfigError, match=r"factor"):
        make(MINIMAL, rope_scaling={"rope_type": "linear"})


def test_required_key_given_as_null_is_a_config_error():
    with pytest.raises(ConfigError, match=r"missing or null.*vocab_size"):
        make(MINIMAL, vocab_size=None)


def test_rope_parameters_theta_wins_over_an_explicit_null():
    # A null top-level rope_theta must not fall back to 10000 (the slip docs/model.md §6 warns of in vLLM).
    cfg = make(MINIMAL, rope_theta=None, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    assert cfg.rope_theta == 1e6
