"""The engine's settings, in one place: `EngineConfig` (every setting, its default and its help text),
`ParallelConfig`, the model presets for dummy weights, dtype names, and the checkpoint's
generation_config.json.

A setting is one dataclass field. Its metadata (help text, choices, short aliases) is all the command
line needs: `add_cli_args` generates `--flag` from each field, as vLLM's EngineArgs does, and `LLM(**kwargs)`
takes the same names. A new setting is one field here and nothing else.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import typing
from dataclasses import dataclass, field

import torch

from ..config import Param2MoEConfig
from ..quant.plan import OPTIONS as QUANT_OPTIONS

log = logging.getLogger("param2moe")

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}


# ---------------------------------------------------------------------- model presets (dummy weights, the writer)
PRESETS: dict[str, dict] = {
    # The released Param2-17B-A2.4B (docs/model.md §1).
    "param2-17b": dict(
        vocab_size=128008, hidden_size=2048, num_hidden_layers=21, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, intermediate_size=9216, moe_intermediate_size=2048,
        num_experts=64, num_experts_per_tok=6, num_shared_experts=2, moe_shared_expert_intermediate_size=4096,
        first_k_dense_replace=1, n_group=1, topk_group=1, score_function="sigmoid", routed_scaling_factor=2.5,
        norm_topk_prob=True, moe_router_enable_expert_bias=True, router_dtype="fp32", use_qk_norm=True,
        use_qkv_bias=False, use_bias=False, tie_word_embeddings=True, rope_theta=1e6,
        partial_rotary_factor=1.0, rope_scaling=None, max_position_embeddings=4096, rms_norm_eps=1e-6,
        num_nextn_predict_layers=0, torch_dtype="bfloat16"),
    # Param2's layout scaled far down (2.4 MB in bf16), random weights: the packaged model before the trained demo.
    "bundled": dict(
        vocab_size=1024, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, intermediate_size=384, moe_intermediate_size=32, num_experts=16, num_experts_per_tok=4,
        num_shared_experts=2, moe_shared_expert_intermediate_size=64, first_k_dense_replace=1,
        n_group=1, topk_group=1, score_function="sigmoid", routed_scaling_factor=2.5, norm_topk_prob=True,
        moe_router_enable_expert_bias=True, router_dtype="fp32", use_qk_norm=True, tie_word_embeddings=True,
        rope_theta=1e6, max_position_embeddings=4096, rms_norm_eps=1e-6, torch_dtype="bfloat16"),
    # Param2's layout scaled down, larger (tests and benchmarks).
    "small": dict(
        vocab_size=2048, hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
        head_dim=32, intermediate_size=768, moe_intermediate_size=128, num_experts=16, num_experts_per_tok=4,
        num_shared_experts=2, moe_shared_expert_intermediate_size=256, first_k_dense_replace=1,
        n_group=1, topk_group=1, score_function="sigmoid", routed_scaling_factor=2.5, norm_topk_prob=True,
        moe_router_enable_expert_bias=True, router_dtype="fp32", use_qk_norm=True, tie_word_embeddings=True,
        rope_theta=1e6, max_position_embeddings=4096, rms_norm_eps=1e-6, torch_dtype="bfloat16"),
    # For tests: a few layers, float32.
    "tiny": dict(
        vocab_size=512, hidden_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, intermediate_size=256, moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2,
        num_shared_experts=1, moe_shared_expert_intermediate_size=64, first_k_dense_replace=1,
        score_function="sigmoid", routed_scaling_factor=1.0, norm_topk_prob=True,
        moe_router_enable_expert_bias=True, router_dtype="fp32", use_qk_norm=True, tie_word_embeddings=True,
        rope_theta=1e6, max_position_embeddings=2048, rms_norm_eps=1e-6, torch_dtype="float32"),
}


def preset_config(preset: str, overrides: dict | None = None) -> Param2MoEConfig:
    if preset not in PRESETS:
        raise EngineConfigError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    raw = {"model_type": "param2moe", "architectures": ["Param2MoEForCausalLM"], **PRESETS[preset], **(overrides or {})}
    return Param2MoEConfig.from_dict(raw)


MAX_LORA_RANK = 64  # the largest LoRA rank a slot takes


class EngineConfigError(ValueError):
    """A setting the engine cannot take; the message names it and says why."""


def setting(default, help: str, *, choices: tuple | None = None, aliases: tuple = (), cli: bool = True):
    """A field of EngineConfig: its default, its help text, the values it takes (checked by `resolve`
    and argparse), its short command-line aliases; cli=False keeps it off the command line."""
    return field(default=default, metadata={"help": help, "choices": choices, "aliases": aliases, "cli": cli})


@dataclass
class EngineConfig:
    model: str | None = setting(
        None, "checkpoint directory or Hugging Face Hub id (default: the bundled demo model, param2-demo)")
    revision: str | None = setting(None, "with a Hub id: the branch, tag or commit to fetch (default: main)")
    dtype: str = setting("auto", "weights and activations; auto: the checkpoint's torch_dtype",
                         choices=("auto", *DTYPES))
    device: str = setting("auto", "cpu, cuda, cuda:N (auto: cuda if available, else cpu)")
    max_model_len: int | None = setting(None, "context length (default: the model's max_position_embeddings)")
    max_num_seqs: int = setting(256, "most sequences in one step")
    max_num_batched_tokens: int = setting(2048, "most tokens in one step (prompts are split into chunks)")
    block_size: int = setting(16, "tokens a KV-cache block holds")
    kv_cache_memory: int | None = setting(
        None, "bytes of KV cache (default: 2 GiB at most on CPU, a share of free memory on GPU)")
    gpu_memory_utilization: float = setting(0.9, "share of the GPU's memory the engine may use in all")
    enable_prefix_caching: bool = setting(True, "reuse the KV cache of prompt prefixes seen before")
    seed: int = setting(0, "seed of the engine's random state (dummy weights, unseeded sampling)")
    load_format: str = setting("auto", "dummy: random weights from config.json or --preset (no weight files)",
                               choices=("auto", "dummy"))
    preset: str | None = setting(None, "with --load-format dummy and no --model: a preset model config",
                                 choices=tuple(PRESETS))
    uniform_random_routing: bool | None = setting(
        None, "each token takes uniformly random experts (default: on with dummy weights, docs/model.md §7)", cli=False)
    enforce_eager: bool = setting(False, "no CUDA graphs")
    max_graph_tokens: int = setting(
        2048, "steps of up to this many tokens (prefills too) replay CUDA graphs; 0: decode steps only")
    kernels: str = setting("auto", "torch: the plain torch ops even on a GPU (the benchmarks' baseline)",
                           choices=("auto", "torch"))
    tensor_parallel_size: int = setting(1, "ranks splitting attention heads, widths and the vocabulary",
                                        aliases=("-tp",))
    pipeline_parallel_size: int = setting(1, "pipeline stages splitting the layers", aliases=("-pp",))
    enable_expert_parallel: bool = setting(
        False, "split the routed experts over the tensor-parallel ranks instead of their width")
    enable_eplb: bool = setting(
        False, "expert load balancing: count each expert's tokens, replicate the busiest, rearrange the experts "
               "over the ranks every --eplb-step-interval steps (with --enable-expert-parallel, or one rank)")
    num_redundant_experts: int = setting(0, "with --enable-eplb: extra expert slots holding replicas of busy experts")
    eplb_window_size: int = setting(1000, "with --enable-eplb: steps of expert load the placement is computed from")
    eplb_step_interval: int = setting(3000, "with --enable-eplb: steps between rearrangements of the experts")
    async_scheduling: bool | None = setting(
        None, "launch each step before reading the previous step's tokens (default: on CUDA with one "
              "pipeline stage)")
    enable_lora: bool = setting(False, "serve LoRA adapters (PEFT folders; requests name theirs)")
    max_loras: int = setting(1, "with --enable-lora: adapters one step can mix (slots on the device)")
    max_lora_rank: int = setting(16, f"with --enable-lora: the largest adapter rank served, at most {MAX_LORA_RANK}")
    lora_routed_experts: bool = setting(
        False, "with --enable-lora: slots for adapters of the routed experts too (num_experts times the memory "
               "of the other modules' slots)")
    quantization: str | None = setting(
        None, "weights quantized while they load (default: as the checkpoint is): int8 per channel, int4 groups of "
              "128, fp8 per channel, fp8-block 128x128 blocks", choices=QUANT_OPTIONS, aliases=("-q",))
    quantize_head: bool = setting(False, "with quantization: the output head too (default: high precision)")
    mmap_weights: bool = setting(
        True, "on a CPU, weights the checkpoint stores in the model's dtype stay in its memory-mapped files (shared, "
              "no copy; not with LoRA or EPLB); --no-mmap-weights copies them into the process")
    grammar_compile_timeout: float = setting(
        30.0, "seconds a structured output's grammar may take to compile (a request whose grammar takes longer "
              "fails alone)")

    def resolve(self) -> EngineConfig:
        """Check the settings and fill in what `auto`/None stand for (the model's folder, the device)."""
        for f in dataclasses.fields(self):
            value, choices = getattr(self, f.name), f.metadata.get("choices")
            if choices and value is not None and value not in choices:
                raise EngineConfigError(f"{f.name}={value!r}: expected one of {', '.join(map(str, choices))}")
        if self.model is None and self.preset is None:
            self.model = default_model_path()
        elif self.model is not None:
            from ..hub import resolve_model

            self.model_id = getattr(self, "model_id", None) or self.model  # as given (served under this name)
            self.model = resolve_model(self.model, self.revision)
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        _check_device(self.device)
        for name in ("eplb_window_size", "eplb_step_interval"):
            if getattr(self, name) < 1:
                raise EngineConfigError(f"{name}={getattr(self, name)}: must be at least 1")
        if self.uniform_random_routing is None:
            self.uniform_random_routing = self.load_format == "dummy"
        if self.enable_lora and self.max_loras < 1:
            raise EngineConfigError(f"max_loras={self.max_loras}: must be at least 1")
        if self.enable_lora and not 1 <= self.max_lora_rank <= MAX_LORA_RANK:
            raise EngineConfigError(f"max_lora_rank={self.max_lora_rank}: must be in [1, {MAX_LORA_RANK}]")
        if self.enable_lora and self.enable_eplb:  # adapters' expert slots are logical; EPLB routes to physical ones
            raise EngineConfigError("enable_lora with enable_eplb: not supported together")
        return self

    @property
    def model_name(self) -> str:
        """What the model is called: a Hub id as given (not its cache folder), a folder's name, or the preset."""
        given = getattr(self, "model_id", None)
        if given and not os.path.isdir(given):
            return given
        return os.path.basename(os.path.normpath(self.model)) if self.model else (self.preset or "model")

    @property
    def token_budget(self) -> int:
        """The most tokens a step takes (a step holds at least one token a running sequence)."""
        return max(self.max_num_batched_tokens, self.max_num_seqs)

    def model_config(self) -> Param2MoEConfig:
        return Param2MoEConfig.from_pretrained(self.model) if self.model is not None else preset_config(self.preset)

    @property
    def parallel(self) -> ParallelConfig:
        return ParallelConfig(self.tensor_parallel_size, self.pipeline_parallel_size, self.enable_expert_parallel,
                              self.enable_eplb, self.num_redundant_experts)

    # ------------------------------------------------------------------ worker processes
    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> EngineConfig:
        return cls(**json.loads(text))

    # ------------------------------------------------------------------ the command line
    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        """One option a field: `--max-num-seqs` for max_num_seqs; booleans get `--x/--no-x`."""
        group = parser.add_argument_group("engine")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.metadata.get("cli", True):
                continue
            flags = ["--" + f.name.replace("_", "-"), *f.metadata.get("aliases", ())]
            kind = _base_type(hints[f.name])
            kw = dict(dest=f.name, default=f.default, help=_help(f))
            if kind is bool:
                group.add_argument(*flags, action=argparse.BooleanOptionalAction, **kw)
            else:
                group.add_argument(*flags, type=kind, choices=f.metadata.get("choices"), **kw)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> EngineConfig:
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


def _base_type(hint):
    """int for `int | None`, and so on."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _help(f: dataclasses.Field) -> str:
    default = "" if f.default is None or isinstance(f.default, bool) else f" (default: {f.default})"
    return f.metadata["help"].replace("%", "%%") + ("" if "default" in f.metadata["help"] else default)


def _check_device(name: str) -> None:
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise EngineConfigError(f"device={name!r}: expected cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise EngineConfigError(f"device={name!r}: CUDA is not available ({why})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise EngineConfigError(f"device={name!r}: there are {torch.cuda.device_count()} GPU(s)")


def default_model_path() -> str:
    """The model of `LLM()`, `generate`, `chat` and `serve` without a model: the small trained Param2MoE demo
    model that ships with the package (scripts/train_demo_model.py; its README.md is the model card). The
    server names it by this folder's name."""
    return os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "param2-demo")


def resolve_dtype(config: EngineConfig, model_config: Param2MoEConfig) -> torch.dtype:
    name = model_config.torch_dtype if config.dtype == "auto" else config.dtype
    if name not in DTYPES:
        raise EngineConfigError(f"dtype={name!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


# ---------------------------------------------------------------------- tensor and pipeline parallelism
@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    enable_expert_parallel: bool = False
    enable_eplb: bool = False
    num_redundant_experts: int = 0

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def validate(self, cfg: Param2MoEConfig) -> None:
        tp, pp = self.tensor_parallel_size, self.pipeline_parallel_size
        if tp < 1 or pp < 1:
            raise EngineConfigError("tensor_parallel_size and pipeline_parallel_size must be >= 1")
        rules = [(cfg.num_attention_heads % tp == 0, f"num_attention_heads ({cfg.num_attention_heads})"),
                 (cfg.num_kv_heads % tp == 0 or tp % cfg.num_kv_heads == 0,
                  f"num_key_value_heads ({cfg.num_kv_heads}) (or be a multiple of it)"),
                 (cfg.intermediate_size % tp == 0, f"intermediate_size ({cfg.intermediate_size})"),
                 (cfg.shared_expert_intermediate_size % tp == 0,
                  f"the shared-expert width ({cfg.shared_expert_intermediate_size})")]
        if cfg.is_moe:
            if self.enable_expert_parallel and not self.enable_eplb:  # with EPLB: the physical experts (below)
                rules.append((cfg.num_experts % tp == 0, f"num_experts ({cfg.num_experts})"))
            else:
                width = cfg.moe_intermediate_size
                rules.append((width % tp == 0, f"moe_intermediate_size ({width})"))
        for ok, what in rules:
            if not ok:
                raise EngineConfigError(f"tensor_parallel_size={tp} must divide {what}")
        if pp > cfg.num_hidden_layers:
            raise EngineConfigError(f"pipeline_parallel_size={pp} exceeds num_hidden_layers ({cfg.num_hidden_layers})")
        self._validate_eplb(cfg)

    def _validate_eplb(self, cfg: Param2MoEConfig) -> None:
        tp, extra = self.tensor_parallel_size, self.num_redundant_experts
        if not self.enable_eplb:
            if extra:
                raise EngineConfigError(f"num_redundant_experts={extra} needs enable_eplb")
            return
        rules = [(cfg.is_moe, "a MoE model (this one has no routed experts)"),
                 (extra >= 0, f"num_redundant_experts >= 0 (got {extra})"),
                 (self.pipeline_parallel_size == 1, "one pipeline stage"),
                 (tp == 1 or self.enable_expert_parallel,
                  "enable_expert_parallel with tensor_parallel_size > 1 (without it every rank holds every expert)"),
                 (not cfg.is_moe or (cfg.num_experts + extra) % tp == 0,
                  f"num_experts + num_redundant_experts ({cfg.num_experts} + {extra}) divisible by "
                  f"tensor_parallel_size ({tp})")]
        for ok, what in rules:
            if not ok:
                raise EngineConfigError(f"enable_eplb needs {what}")


# ---------------------------------------------------------------------- the checkpoint's generation_config.json
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def read_generation_config(model_dir: str | None) -> dict:
    """The checkpoint's generation_config.json ({} when there is none, or it cannot be read: a warning)."""
    file = os.path.join(model_dir, "generation_config.json") if model_dir else ""
    if not file or not os.path.exists(file):
        return {}
    try:
        with open(file) as f:
            gen = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        log.warning("could not read %s (%s); no generation defaults from it", file, e)
        return {}
    if not isinstance(gen, dict):
        log.warning("%s is not a JSON object; no generation defaults from it", file)
        return {}
    return gen


def sampling_defaults(gen: dict) -> dict:
    """The sampling fields generation_config.json sets, as vLLM applies them (`--generation-config auto`)."""
    return {k: gen[k] for k in SAMPLING_KEYS if gen.get(k) is not None}


def default_max_tokens(gen: dict) -> int | None:
    """generation_config.json's max_new_tokens: a reply's length when the request sets none (else the rest
    of the context), as vLLM applies it."""
    n = gen.get("max_new_tokens")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def generation_eos_ids(gen: dict) -> list[int]:
    """generation_config.json's eos_token_id (an id or a list; as vLLM reads it, it may add the end of turn)."""
    ids = gen.get("eos_token_id")
    return [i for i in (ids if isinstance(ids, list) else [ids]) if isinstance(i, int)]
