"""`param2moe quantize IN OUT --method int8|int4|fp8|fp8-block`: a compressed-tensors checkpoint (the format
llm-compressor writes and vLLM loads) of the checkpoint at IN, quantized tensor by tensor as it streams.

Every gate/up/down projection and attention projection is quantized as `--quantization` would at load
(quant/plan.py); the router, norms, embeddings and head are copied as they are and listed in `ignore`.
int4 and int8: format pack-quantized (W4A16 group 128, or `plan.int4_group`'s smaller one, W8A16 per channel); fp8:
float-quantized, per channel with dynamic per-token fp8 activations (llm-compressor's FP8_DYNAMIC), fp8-block:
128x128 weight blocks with dynamic per-128-group activations (FP8_BLOCK). Scales are stored in float32, so
param2moe reads back exactly the weights it would have made at load (vLLM casts them to its activation dtype where
its kernels want that).
"""

from __future__ import annotations

import json
import os
import shutil

from .convert import to_compressed
from .formats import FP8_BLOCK, INT4_GROUP, QuantFormatError
from .loading import make_plan
from .plan import QuantPlan, input_widths, quantizable
from .prequantized import read_checkpoint_quant

# Modules that stay in high precision, as compressed-tensors names them (exact names or "re:" + regex).
IGNORE = ["lm_head", r"re:.*mlp\.gate$", r"re:.*norm$", r"re:.*word_embeddings$"]


def compressed_tensors_config(option: str, group_size: int = INT4_GROUP) -> dict:
    """config.json's quantization_config for a checkpoint of `option` (int4: with this group size)."""
    fp8 = option.startswith("fp8")
    weights = {"num_bits": 4 if option == "int4" else 8, "type": "float" if fp8 else "int", "symmetric": True,
               "dynamic": False, "strategy": {"int4": "group", "fp8-block": "block"}.get(option, "channel"),
               "group_size": group_size if option == "int4" else None,
               "block_structure": [FP8_BLOCK, FP8_BLOCK] if option == "fp8-block" else None,
               "actorder": None, "observer": "minmax", "observer_kwargs": {}}
    activations = None
    if fp8:  # dynamic fp8 activations: what vLLM runs such checkpoints with (param2moe's kernels choose their own)
        activations = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": True,
                       "strategy": "group" if option == "fp8-block" else "token",
                       "group_size": FP8_BLOCK if option == "fp8-block" else None, "observer": None}
    fmt = "float-quantized" if fp8 else "pack-quantized"
    return {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "input_activations": activations, "output_activations": None,
                                          "format": fmt}},
            "ignore": IGNORE, "kv_cache_scheme": None, "sparsity_config": {}, "global_compression_ratio": None}


def quantize_checkpoint(src: str, out: str, option: str, shard_bytes: int = 2 << 30, progress: bool = True) -> None:
    """Write the quantized copy of the checkpoint folder src to out (config, weights, and every other file)."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    from ..checkpoint import iter_checkpoint_tensors, resolve_shared_width
    from ..config import Param2MoEConfig
    from ..writer import _flush, _write_json

    QuantPlan(option)  # names a bad option before anything is read
    if read_checkpoint_quant(src) is not None:
        raise QuantFormatError(f"{src} is already pre-quantized (config.json has a quantization_config)")
    cfg = resolve_shared_width(Param2MoEConfig.from_pretrained(src), src)
    plan = make_plan(option, None, widths=input_widths(cfg))  # as quantization at load makes it, on one process
    if os.path.abspath(src) == os.path.abspath(out):
        raise ValueError("quantize: OUT must be another folder than IN")
    os.makedirs(out, exist_ok=True)
    shards: list[dict] = [{}]
    size = 0
    for _, name, f in tqdm(iter_checkpoint_tensors(src), desc="Quantizing", unit="tensor", disable=not progress):
        module = name.removesuffix(".weight")
        if module != name and quantizable(module):
            tensors = {f"{module}.{leaf}": t for leaf, t in to_compressed(plan.quantize(f.tensor(name))).items()}
        else:
            tensors = {name: f.tensor(name).clone()}  # (the file's mapping closes after it)
        f.release(name)
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        if size and size + nbytes > shard_bytes:
            _flush(shards, out, save_file)
            shards.append({})
            size = 0
        shards[-1].update(tensors)
        size += nbytes
    _flush(shards, out, save_file, last=True)
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = compressed_tensors_config(option, plan.group_size)
    _write_json(os.path.join(out, "config.json"), config)
    for name in os.listdir(src):  # tokenizer, generation config, ...
        if not name.endswith(".safetensors") and name not in ("config.json", "model.safetensors.index.json") \
                and os.path.isfile(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(out, name))
