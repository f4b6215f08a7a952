"""Param2MoEConfig: the model's hyper-parameters, read from a checkpoint's config.json.

One source of truth for every config key: its default lives in `_DEFAULTS` (docs/model.md §2),
the derived values are properties, and `validate()` names the key and the rule it breaks.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

MODEL_TYPES = ("param2moe", "bailing_moe_v2")
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


class ConfigError(ValueError):
    """A config.json value breaks a rule; the message names the key."""


@dataclass
class Param2MoEConfig:
    # Required: the shape of the network.
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    # Attention.
    num_key_value_heads: int | None = None  # None: same as num_attention_heads
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    use_qk_norm: bool = False
    use_qkv_bias: bool = False
    use_bias: bool = False
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    # Mixture of experts.
    num_experts: int | None = None  # None: every layer is dense
    num_experts_per_tok: int | None = None
    moe_intermediate_size: int | None = None
    first_k_dense_replace: int = 1
    num_shared_experts: int = 1
    moe_shared_expert_intermediate_size: int | None = None
    n_group: int | None = None
    topk_group: int | None = None
    score_function: str = "sigmoid"
    moe_router_enable_expert_bias: bool = True
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    router_dtype: str = "fp32"
    # Head, tokens, misc.
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 0
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] | None = 3
    pad_token_id: int | None = 0
    torch_dtype: str = "bfloat16"
    model_type: str = "param2moe"
    architectures: list[str] = field(default_factory=lambda: ["Param2MoEForCausalLM"])

    # ----------------------------------------------------------------- derived values
    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim else self.hidden_size // self.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_size * self.partial_rotary_factor)

    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None

    def is_dense_layer(self, layer_idx: int) -> bool:
        return not self.is_moe or layer_idx < self.first_k_dense_replace

    @property
    def shared_expert_intermediate_size(self) -> int:
        """Total width of the fused shared expert (docs/model.md §3.4); 0 when there is none."""
        if not self.is_moe or self.num_shared_experts == 0:
            return 0
        if self.moe_shared_expert_intermediate_size is not None:
            return self.moe_shared_expert_intermediate_size
        return self.moe_intermediate_size * self.num_shared_experts

    @property
    def grouped_routing(self) -> bool:
        return self.n_group is not None and self.topk_group is not None

    @property
    def rope_params(self) -> dict:
        """The rope scaling dict with its type under `rope_type` ({'rope_type': 'default'} if none)."""
        params = dict(self.rope_scaling or {})
        if "rope_type" not in params and "type" in params:
            params["rope_type"] = params.pop("type")
        params.setdefault("rope_type", "default")
        return params

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    # ----------------------------------------------------------------- reading and writing
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Param2MoEConfig:
        raw = dict(raw)
        model_type = raw.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ConfigError(
                f"config.json: model_type {model_type!r} is not supported (expected one of {MODEL_TYPES})"
            )
        # Newer configs carry the rope dict as `rope_parameters`, which may also hold rope_theta.
        rope_parameters = raw.pop("rope_parameters", None)
        if rope_parameters is not None:
            rope_parameters = dict(rope_parameters)
            if "rope_theta" in rope_parameters:
                theta = rope_parameters.pop("rope_theta")
                if raw.get("rope_theta") is None:  # an explicit null must not fall back to 10000
                    raw["rope_theta"] = theta
            kind = rope_parameters.get("rope_type", rope_parameters.get("type", "default"))
            if raw.get("rope_scaling") is None and (kind != "default" or len(rope_parameters) > 1):
                raw["rope_scaling"] = rope_parameters
        if raw.get("torch_dtype") is None and raw.get("dtype") is not None:
            raw["torch_dtype"] = raw["dtype"]
        known = {f.name for f in fields(cls)}
        missing = [f.name for f in fields(cls) if f.name in _REQUIRED and raw.get(f.name) is None]
        if missing:
            raise ConfigError(f"config.json: required key(s) missing or null: {', '.join(missing)}")
        cfg = cls(**{k: v for k, v in raw.items() if k in known and (v is not None or k in _NULLABLE)})
        cfg.validate()
        return cfg

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Param2MoEConfig:
        file = os.path.join(path, "config.json") if os.path.isdir(path) else str(path)
        if not os.path.exists(file):
            raise FileNotFoundError(f"no config.json at {file}")
        with open(file) as f:
            try:
                raw = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{file} is not valid JSON: {e}") from e
        try:
            return cls.from_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{file}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # ----------------------------------------------------------------- validation
    def validate(self) -> None:
        def fail(key: str, rule: str) -> None:
            raise ConfigError(f"{key}={getattr(self, key, None)!r}: {rule}")

        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "intermediate_size", "max_position_embeddings"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(key, "must be a positive integer")
        if self.hidden_act != "silu":
            fail("hidden_act", "only 'silu' exists in this model family")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            fail("hidden_size", f"must be divisible by num_attention_heads ({self.num_attention_heads}) "
                                "when head_dim is not given")
        if self.head_dim is not None and self.head_dim <= 0:
            fail("head_dim", "must be a positive integer")
        if self.num_key_value_heads is not None and (
            self.num_key_value_heads <= 0 or self.num_attention_heads % self.num_key_value_heads
        ):
            fail("num_key_value_heads",
                 f"must divide num_attention_heads ({self.num_attention_heads}) evenly (GQA)")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            fail("partial_rotary_factor", "must be in (0, 1]")
        if self.rotary_dim < 2 or self.rotary_dim % 2:
            fail("partial_rotary_factor", f"gives rotary dim {self.rotary_dim}, which must be even and >= 2")
        if self.rope_theta <= 0:
            fail("rope_theta", "must be positive")
        if self.rms_norm_eps <= 0:
            fail("rms_norm_eps", "must be positive")
        self._validate_rope()
        if self.num_hidden_layers < 1:
            fail("num_hidden_layers", "must be at least 1")
        if self.router_dtype not in ("fp32", "float32", "bf16", "bfloat16", "fp16", "float16"):
            fail("router_dtype", "must be fp32, bf16 or fp16")
        if self.is_moe:
            self._validate_moe(fail)
        if self.torch_dtype not in ("bfloat16", "float16", "float32"):
            fail("torch_dtype", "must be bfloat16, float16 or float32")

    def _validate_moe(self, fail) -> None:
        e = self.num_experts
        if not isinstance(e, int) or e <= 0:
            fail("num_experts", "must be a positive integer or null (dense)")
        k = self.num_experts_per_tok
        if not isinstance(k, int) or not 0 < k <= e:
            fail("num_experts_per_tok", f"must be an integer in [1, num_experts={e}]")
        if not isinstance(self.moe_intermediate_size, int) or self.moe_intermediate_size <= 0:
            fail("moe_intermediate_size", "must be a positive integer when num_experts is set")
        if self.first_k_dense_replace < 0:
            fail("first_k_dense_replace", "must be >= 0")
        if self.num_shared_experts < 0:
            fail("num_shared_experts", "must be >= 0")
        if self.score_function not in ("sigmoid", "softmax"):
            fail("score_function", "must be 'sigmoid' or 'softmax'")
        if (self.n_group is None) != (self.topk_group is None):
            fail("n_group", "n_group and topk_group must be set together (grouped routing) or both absent")
        if self.grouped_routing:
            if self.n_group <= 0 or e % self.n_group:
                fail("n_group", f"must be positive and divide num_experts ({e})")
            if not 0 < self.topk_group <= self.n_group:
                fail("topk_group", f"must be in [1, n_group={self.n_group}]")
            if k > self.topk_group * (e // self.n_group):
                fail("num_experts_per_tok",
                     f"must be <= topk_group * experts per group = {self.topk_group * (e // self.n_group)}")

    def _validate_rope(self) -> None:
        if self.rope_scaling is None:
            return
        if not isinstance(self.rope_scaling, dict):
            raise ConfigError(f"rope_scaling={self.rope_scaling!r}: must be a dict or null")
        p = self.rope_params
        kind = p["rope_type"]
        if kind not in ROPE_TYPES:
            raise ConfigError(f"rope_scaling.rope_type={kind!r}: unknown rope type (known: {', '.join(ROPE_TYPES)})")
        if kind != "default":
            factor = p.get("factor")
            if not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor < 1.0:
                raise ConfigError(f"rope_scaling.factor={factor!r}: {kind} scaling needs a factor >= 1")
        if kind == "llama3":
            for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                if key not in p:
                    raise ConfigError(f"rope_scaling.{key}: required for llama3 rope scaling")
            if p["high_freq_factor"] <= p["low_freq_factor"]:
                raise ConfigError("rope_scaling.high_freq_factor: must be greater than low_freq_factor")


_REQUIRED = {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"}
# Keys whose explicit null means something (not "use the default").
_NULLABLE = {"num_experts", "head_dim", "num_key_value_heads", "rope_scaling", "n_group", "topk_group",
             "moe_shared_expert_intermediate_size", "bos_token_id", "eos_token_id", "pad_token_id",
             "num_experts_per_tok", "moe_intermediate_size"}
