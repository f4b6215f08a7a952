"""Adapter folders on disk: writing PEFT-format adapters (random ones for tests and benchmarks), and
merging an adapter into a copy of its base checkpoint (W + scale * B @ A: what the served adapter
must equal; the tests' oracle)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil

import torch

from ..config import Param2MoEConfig
from .adapter import CONFIG_FILE, WEIGHTS_FILE, lora_targets, module_scale, read_adapter_config

# Module kinds by the checkpoint names they cover (tests and benchmarks pick adapters by kind).
KINDS = {
    "qkv": r"\.attention\.query_key_value$",
    "dense": r"\.attention\.dense$",
    "dense_mlp": r"\.mlp\.(gate|up|down)_proj$",
    "shared_experts": r"\.mlp\.shared_experts\.(gate|up|down)_proj$",
    "routed_experts": r"\.mlp\.experts\.\d+\.(gate|up|down)_proj$",
}


def write_adapter(out_dir: str, modules: dict[str, tuple[torch.Tensor, torch.Tensor]], r: int, lora_alpha: float,
                  use_rslora: bool = False, base_model: str = "", extra_config: dict | None = None) -> None:
    """A PEFT LoRA folder: modules maps checkpoint module names to (A [r, in], B [out, r])."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    leaves = sorted({name.rpartition(".")[2] for name in modules})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "r": r,
              "lora_alpha": lora_alpha, "use_rslora": use_rslora, "target_modules": leaves, "lora_dropout": 0.0,
              "bias": "none", "fan_in_fan_out": False, "use_dora": False, "inference_mode": True,
              "rank_pattern": {}, "alpha_pattern": {}, **(extra_config or {})}
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)
    tensors = {}
    for name, (a, b) in modules.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.contiguous()
    save_file(tensors, os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": "pt"})


def random_adapter(out_dir: str, model_config: Param2MoEConfig, kinds: list[str], r: int = 8,
                   lora_alpha: float | None = None, use_rslora: bool = False, seed: int = 0,
                   strength: float = 0.5, dtype=torch.float32) -> list[str]:
    """Write an adapter with random A and B on every module of the given kinds (see KINDS); each delta
    about `strength` times the size of a base weight of the writer's. Returns the modules."""
    gen = torch.Generator().manual_seed(seed)
    alpha = float(lora_alpha if lora_alpha is not None else 2 * r)
    scale = alpha / (math.sqrt(r) if use_rslora else r)
    pattern = re.compile("|".join(KINDS[k] for k in kinds))
    modules = {}
    for name, (out_f, in_f) in lora_targets(model_config).items():
        if pattern.search(name):
            a = torch.randn(r, in_f, generator=gen) / in_f**0.5
            # entries of scale * B @ A about strength times the writer's base weights (std 1.7 / sqrt(hidden))
            b = torch.randn(out_f, r, generator=gen) * strength * 1.7 * (in_f / (model_config.hidden_size * r)) ** 0.5
            b = b / scale
            modules[name] = (a.to(dtype), b.to(dtype))
    if not modules:
        raise ValueError(f"kinds {kinds}: no module of this model matches")
    write_adapter(out_dir, modules, r, alpha, use_rslora)
    return list(modules)


def merge_adapter(base_dir: str, adapter_dir: str, out_dir: str) -> None:
    """Write base_dir's checkpoint with the adapter merged into its weights (in float32, stored in the
    checkpoint's dtype) to out_dir; config, tokenizer and other files are copied."""
    from safetensors.torch import load_file, save_file

    cfg = read_adapter_config(adapter_dir)
    adapter = load_file(os.path.join(adapter_dir, WEIGHTS_FILE))
    deltas = {}
    for key, a in adapter.items():
        if ".lora_A." in key:
            module = key.removeprefix("base_model.model.").rsplit(".lora_A.", 1)[0]
            b = adapter[key.replace(".lora_A.", ".lora_B.")]
            deltas[module + ".weight"] = module_scale(cfg, module)[1] * (b.double() @ a.double())
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(base_dir):
        src = os.path.join(base_dir, name)
        if not name.endswith(".safetensors") and os.path.isfile(src):
            shutil.copy(src, os.path.join(out_dir, name))
    for name in sorted(os.listdir(base_dir)):
        if not name.endswith(".safetensors"):
            continue
        tensors = load_file(os.path.join(base_dir, name))
        for key in list(tensors):
            if key in deltas:
                w = tensors[key]
                tensors[key] = (w.double() + deltas.pop(key)).to(w.dtype)
        save_file(tensors, os.path.join(out_dir, name), metadata={"format": "pt"})
    if deltas:
        raise ValueError(f"{adapter_dir}: module(s) not in the base checkpoint: {', '.join(sorted(deltas))}")
