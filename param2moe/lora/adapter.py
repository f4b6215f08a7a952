"""PEFT LoRA adapter folders: read, check against the base model, keep as (A, B, scale) per module.

A folder holds `adapter_config.json` and `adapter_model.safetensors` with tensors
`base_model.model.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r], where <module> is a
checkpoint module of Param-2 (SPEC 8): `model.layers.N.attention.query_key_value`, `.attention.dense`,
`.mlp.gate_proj` / `up_proj` / `down_proj` of the dense layers, the same under `.mlp.shared_experts.`
and `.mlp.experts.J.`. The delta of a module is scale * B @ A, scale = lora_alpha / r (rsLoRA:
lora_alpha / sqrt(r)), with PEFT's per-module `rank_pattern` / `alpha_pattern`.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field

import torch

from ..checkpoint import checkpoint_layout
from ..config import Param2MoEConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
TARGET_LEAVES = ("query_key_value", "dense", "gate_proj", "up_proj", "down_proj")
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
_EXPERT = re.compile(r"\.mlp\.experts\.\d+\.")


class LoRAError(ValueError):
    """An adapter that cannot be served: the message names the file, key or tensor that is wrong."""


@dataclass
class LoRAModule:
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass
class LoRAAdapter:
    name: str
    lora_id: int
    path: str
    modules: dict[str, LoRAModule] = field(default_factory=dict)  # checkpoint module name -> weights
    cache_salt: tuple | None = None  # set by the engine: its prompts' prefix-cache blocks are its own

    @property
    def rank(self) -> int:
        return max((m.rank for m in self.modules.values()), default=0)

    @property
    def routed_expert_modules(self) -> list[str]:
        return [name for name in self.modules if _EXPERT.search(name)]

    def to(self, device) -> LoRAAdapter:
        for m in self.modules.values():
            m.a, m.b = m.a.to(device), m.b.to(device)
        return self


def lora_targets(cfg: Param2MoEConfig) -> dict[str, tuple[int, int]]:
    """Every module of the base model an adapter may target, with its weight's shape (out, in); the
    checkpoint's name map is the one source of both."""
    out = {}
    for name, shape in checkpoint_layout(cfg).items():
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and len(shape) == 2 and module.rpartition(".")[2] in TARGET_LEAVES:
            out[module] = shape
    return out


def read_adapter_config(path: str) -> dict:
    """adapter_config.json, checked for the options this engine serves."""
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.isdir(path):
        raise LoRAError(f"adapter folder {path!r} does not exist")
    if not os.path.exists(file):
        raise LoRAError(f"{path}: no {CONFIG_FILE} (a PEFT LoRA adapter folder has it)")
    try:
        with open(file) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise LoRAError(f"{file} is not valid JSON: {e}") from e

    def bad(key: str, why: str):
        raise LoRAError(f"{file}: {key}={cfg.get(key)!r}: {why}")

    if cfg.get("peft_type", "LORA") != "LORA":
        bad("peft_type", "only LORA adapters are served")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        bad("r", "must be a positive integer")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        bad("lora_alpha", "must be a number")
    for key, why in (("use_dora", "DoRA adapters are not served"),
                     ("fan_in_fan_out", "Param-2's modules are Linear layers (fan_in_fan_out false)"),
                     ("lora_bias", "adapters with a bias on lora_B are not served"),
                     ("modules_to_save", "adapters that replace whole modules are not served"),
                     ("layer_replication", "layer replication is not served")):
        if cfg.get(key):
            bad(key, why)
    if cfg.get("bias", "none") != "none":
        bad("bias", "adapters that train the base model's biases are not served (bias must be 'none')")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(key) or {}, dict):
            bad(key, "must be an object")
    return cfg


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def module_scale(cfg: dict, module: str) -> tuple[int, float]:
    """(r, scale) PEFT gives this module from adapter_config.json."""
    r = _pattern_value(cfg.get("rank_pattern"), module, cfg["r"])
    alpha = _pattern_value(cfg.get("alpha_pattern"), module, cfg["lora_alpha"])
    return r, alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)


def _read_tensors(path: str) -> dict[str, dict[str, tuple[str, torch.Tensor]]]:
    """module -> {"A": tensor, "B": tensor} from adapter_model.safetensors; unknown keys refused by name."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = os.path.join(path, WEIGHTS_FILE)
    if not os.path.exists(file):
        pickles = [f for f in ("adapter_model.bin", "adapter_model.pt") if os.path.exists(os.path.join(path, f))]
        extra = f" ({pickles[0]} is there: pickle files are not loaded, since unpickling can run arbitrary code; " \
                "save with safe_serialization=True)" if pickles else ""
        raise LoRAError(f"{path}: no {WEIGHTS_FILE}{extra}")
    try:
        tensors = load_file(file)
    except (SafetensorError, OSError) as e:
        raise LoRAError(f"{file}: not a readable safetensors file: {e}") from e
    modules: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise LoRAError(f"{file}: tensor {key!r} is not a LoRA weight of this engine's form "
                            "(base_model.model.<module>.lora_A.weight / .lora_B.weight)")
        modules.setdefault(m["module"], {})[m["ab"]] = (key, t)
    return modules


def load_adapter(path: str, model_config: Param2MoEConfig, max_rank: int, name: str = "",
                 lora_id: int = 0) -> LoRAAdapter:
    """Read the adapter at `path` and check every tensor against the base model; float32 on the CPU."""
    cfg = read_adapter_config(path)
    targets = lora_targets(model_config)
    file = os.path.join(path, WEIGHTS_FILE)
    adapter = LoRAAdapter(name or os.path.basename(os.path.normpath(path)), lora_id, path)
    for module, pair in _read_tensors(path).items():
        for ab in "AB":
            if ab not in pair:
                other = pair["B" if ab == "A" else "A"][0]
                raise LoRAError(f"{file}: tensor {other!r} has no lora_{ab} partner")
        (key_a, a), (key_b, b) = pair["A"], pair["B"]
        if module not in targets:
            leaf = module.rpartition(".")[2]
            why = ("not a module of this base model" if leaf in TARGET_LEAVES else
                   f"LoRA on {leaf!r} is not served (targets: {', '.join(TARGET_LEAVES)})")
            raise LoRAError(f"{file}: tensor {key_a!r}: {why}")
        out_f, in_f = targets[module]
        for key, t in ((key_a, a), (key_b, b)):
            if not t.is_floating_point() or not torch.isfinite(t).all():
                raise LoRAError(f"{file}: tensor {key!r} must hold finite floating-point values")
        r = a.shape[0] if a.dim() == 2 else -1
        if a.dim() != 2 or a.shape[1] != in_f:
            raise LoRAError(f"{file}: tensor {key_a!r} has shape {list(a.shape)}, expected [r, {in_f}] "
                            f"({module} is [{out_f}, {in_f}])")
        if list(b.shape) != [out_f, r]:
            raise LoRAError(f"{file}: tensor {key_b!r} has shape {list(b.shape)}, expected [{out_f}, {r}] "
                            f"({module} is [{out_f}, {in_f}], lora_A's rank {r})")
        r_cfg, scale = module_scale(cfg, module)
        if r != r_cfg:
            raise LoRAError(f"{file}: tensor {key_a!r} has rank {r}, but adapter_config.json gives this module "
                            f"r={r_cfg}")
        if r > max_rank:
            raise LoRAError(f"{file}: tensor {key_a!r} has rank {r}, more than max_lora_rank={max_rank}")
        adapter.modules[module] = LoRAModule(a.float(), b.float(), float(scale))
    if not adapter.modules:
        raise LoRAError(f"{file}: holds no LoRA tensors")
    return adapter
