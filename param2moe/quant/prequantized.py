"""Pre-quantized checkpoints: config.json's quantization_config, and their tensors converted to our format.

Two families, as users have them:

  quant_method "fp8" (DeepSeek-V3, Qwen3-FP8): `X.weight` float8_e4m3fn and `X.weight_scale_inv` float32, the
      scale of each 128x128 block ([ceil(N/128), ceil(K/128)], despite its name w = q * weight_scale_inv) with
      `weight_block_size: [128, 128]`; without weight_block_size, one `X.weight_scale` per tensor. A module is
      quantized where its scale is stored; `modules_to_not_convert` / `ignored_layers` name the others.
  quant_method "compressed-tensors" (llm-compressor), one scheme in `config_groups`, `ignore` for the rest:
      format "pack-quantized", int weights, symmetric: `X.weight_packed` int32 [N, ceil(K / (32 / bits))], each
      int32 holding 32 / bits values q + 2^(bits-1) along K, the first in the lowest bits; `X.weight_scale`
      [N, K / group] (strategy "group") or [N, 1] ("channel"); `X.weight_shape` [N, K]. int4 group or channel,
      int8 channel.
      format "int-quantized": `X.weight` int8 and `X.weight_scale` [N, 1] (int8 channel).
      format "float-quantized": `X.weight` float8_e4m3fn and `X.weight_scale` [N, 1] ("channel"), [1]
      ("tensor") or [ceil(N/128), ceil(K/128)] ("block", block_structure [128, 128]).
  Activation settings (input_activations, activation_scheme) are read past: param2moe's kernels choose.

A checkpoint whose config and tensors disagree fails with a QuantFormatError naming the tensor and the fault.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import torch

from ..weights_file import WeightsFile
from .convert import from_checkpoint
from .formats import FP8_BLOCK, QuantFormatError, QuantizedWeight
from .plan import quantizable

_SCALES = ("weight_scale", "weight_scale_inv")
_PARTS = ("weight_packed", *_SCALES, "weight_shape", "weight_zero_point", "weight_g_idx", "input_scale")


@dataclass
class CheckpointQuant:
    """What a pre-quantized checkpoint holds: its scheme, and (after a scan) which modules it stores quantized."""

    quant_method: str  # "fp8" | "compressed-tensors"
    option: str  # our option: int8 | int4 | fp8 | fp8-block
    format: str  # "fp8" (quant_method fp8), "pack-quantized", "int-quantized" or "float-quantized"
    group_size: int = 0  # int4 group (0: per channel)
    ignore: tuple[str, ...] = ()
    targets_linear: bool = False  # compressed-tensors targets every Linear layer (then those not ignored must be)
    quantized: frozenset[str] = field(default_factory=frozenset)

    def describe(self) -> str:
        return f"quant_method {self.quant_method}, {self.format}"

    def ignored(self, module: str) -> bool:
        for pattern in self.ignore:
            if pattern.startswith("re:"):
                if re.match(pattern[3:], module):
                    return True
            elif module == pattern or (self.quant_method == "fp8" and pattern in module):
                return True
        return False


def read_checkpoint_quant(path: str, files: list[str] | None = None) -> CheckpointQuant | None:
    """The checkpoint's quantization_config (None when it has none). With its weight files: also read their
    tensor names (not their data) to learn which modules are stored quantized, checking them against the config."""
    file = os.path.join(path, "config.json")
    if not os.path.exists(file):
        return None
    with open(file) as f:
        raw = json.load(f).get("quantization_config")
    if raw is None:
        return None
    method = raw.get("quant_method")
    if method == "fp8":
        cq = _fp8_config(raw)
    elif method == "compressed-tensors":
        cq = _compressed_config(raw)
    else:
        raise QuantFormatError(f"config.json quantization_config: quant_method {method!r} is not supported "
                               "(supported: fp8, compressed-tensors)")
    if files is not None:
        cq.quantized = _scan(cq, files)
    return cq


def _fp8_config(raw: dict) -> CheckpointQuant:
    if raw.get("fmt", "e4m3") != "e4m3":
        raise QuantFormatError(f"quantization_config.fmt {raw['fmt']!r}: only e4m3 fp8 weights are supported")
    block = raw.get("weight_block_size")
    if block is not None and list(block) != [FP8_BLOCK, FP8_BLOCK]:
        raise QuantFormatError(f"quantization_config.weight_block_size {block}: only [128, 128] is supported")
    ignore = tuple(raw.get("modules_to_not_convert") or raw.get("ignored_layers") or ())
    return CheckpointQuant("fp8", "fp8-block" if block else "fp8", "fp8", ignore=ignore)


def _compressed_config(raw: dict) -> CheckpointQuant:
    """The one weight scheme of config_groups, mapped to our options (anything else: an error naming it)."""
    where = "quantization_config"
    if raw.get("sparsity_config"):
        raise QuantFormatError(f"{where}.sparsity_config: sparse checkpoints are not supported")
    if raw.get("kv_cache_scheme"):
        raise QuantFormatError(f"{where}.kv_cache_scheme: quantized KV caches are not supported")
    groups = raw.get("config_groups") or {}
    schemes = {json.dumps(g.get("weights"), sort_keys=True): (name, g) for name, g in groups.items()}
    if len(schemes) != 1:
        raise QuantFormatError(f"{where}.config_groups: expected one weight scheme, found {len(schemes)} "
                               f"({', '.join(groups) or 'none'})")
    name, group = next(iter(schemes.values()))
    fmt = group.get("format") or raw.get("format")
    w = group.get("weights") or {}
    here = f"{where}.config_groups.{name}.weights"
    if w.get("dynamic"):
        raise QuantFormatError(f"{here}.dynamic: dynamic weight quantization is not supported")
    if not w.get("symmetric", True):
        raise QuantFormatError(f"{here}.symmetric is false: asymmetric weights (zero points) are not supported")
    if w.get("actorder") not in (None, "static", "weight"):
        raise QuantFormatError(f"{here}.actorder {w['actorder']!r}: activation reordering (g_idx) is not supported")
    kind, bits, strategy = w.get("type"), w.get("num_bits"), w.get("strategy")
    option, group_size = _compressed_option(fmt, kind, bits, strategy, w, here)
    targets = group.get("targets") or []
    return CheckpointQuant("compressed-tensors", option, fmt, group_size, tuple(raw.get("ignore") or ()),
                           targets_linear="Linear" in targets)


def _compressed_option(fmt, kind, bits, strategy, w: dict, here: str) -> tuple[str, int]:
    if fmt == "pack-quantized" and kind == "int" and bits == 4 and strategy in ("group", "channel"):
        return "int4", (w.get("group_size") or 0) if strategy == "group" else 0
    if fmt in ("pack-quantized", "int-quantized") and kind == "int" and bits == 8 and strategy == "channel":
        return "int8", 0
    if fmt == "float-quantized" and kind == "float" and bits == 8:
        if strategy in ("channel", "tensor"):
            return "fp8", 0
        if strategy == "block" and list(w.get("block_structure") or []) == [FP8_BLOCK, FP8_BLOCK]:
            return "fp8-block", 0
    raise QuantFormatError(
        f"{here}: format {fmt!r}, type {kind!r}, num_bits {bits}, strategy {strategy!r} is not supported (supported: "
        "pack-quantized int4 group/channel, pack-quantized or int-quantized int8 channel, float-quantized fp8 "
        "channel/tensor/block 128x128)")


def _parts(files: list[str]) -> dict[str, dict[str, tuple[str, str]]]:
    """module -> {leaf: (file, tensor name)} over every file's tensor names (headers only)."""
    parts: dict[str, dict[str, tuple[str, str]]] = {}
    for file in files:
        with WeightsFile(file) as f:
            for name in f.names():
                module, _, leaf = name.rpartition(".")
                parts.setdefault(module, {})[leaf] = (file, name)
    return parts


def _is_quantized(leaves) -> bool:
    return "weight_packed" in leaves or any(s in leaves for s in _SCALES)


def _scan(cq: CheckpointQuant, files: list[str]) -> frozenset[str]:
    """The modules stored quantized; errors where that contradicts the config."""
    quantized = set()
    for module, leaves in _parts(files).items():
        if _is_quantized(leaves):
            if cq.ignored(module):
                raise QuantFormatError(f"{module}: quantization_config lists it as ignored (not quantized), but the "
                                       f"checkpoint stores it quantized ({', '.join(sorted(leaves))})")
            quantized.add(module)
        elif (cq.targets_linear and "weight" in leaves and quantizable(module) and not cq.ignored(module)):
            raise QuantFormatError(f"{module}.weight: quantization_config quantizes every Linear layer it does not "
                                   "ignore, but this one is stored unquantized")
    return frozenset(quantized)


class QuantizedSource:
    """One quantized checkpoint weight, assembled from its tensors (which may lie in several files): what the
    loader reads in place of a plain tensor. get_shape(): the logical [N, K]; read(): a QuantizedWeight."""

    def __init__(self, cq: CheckpointQuant, module: str, leaves: dict[str, tuple[WeightsFile, str]]):
        self.cq, self.module, self.leaves = cq, module, leaves  # leaf -> (open file, tensor name)

    def get_shape(self) -> tuple[int, ...]:
        if "weight_packed" in self.leaves:
            if "weight_shape" not in self.leaves:
                raise QuantFormatError(f"{self.module}.weight_packed has no {self.module}.weight_shape beside it")
            return tuple(int(v) for v in self._tensor("weight_shape").tolist())
        return tuple(self._tensor("weight").shape)

    def read(self) -> QuantizedWeight:
        tensors = {leaf: self._tensor(leaf) for leaf in self.leaves if leaf != "input_scale"}
        return from_checkpoint(self.cq, self.module, tensors, list(self.get_shape()))

    def _tensor(self, leaf: str) -> torch.Tensor:
        f, name = self.leaves[leaf]
        return f.tensor(name)

    def nbytes(self) -> int:
        return sum(f.nbytes(name) for f, name in self.leaves.values())

    def release(self) -> None:
        for f, name in self.leaves.values():
            f.release(name)


class QuantizedCheckpoint:
    """A pre-quantized checkpoint's files, read as one weights_file.WeightsFile is (names, shape, tensor, nbytes,
    release), except that each quantized module's tensors appear once, as `<module>.weight`, whose tensor() is
    a QuantizedSource. All files stay open (memory-mapped) together: a module's tensors may lie in several."""

    def __init__(self, cq: CheckpointQuant, files: list[str]):
        self.path = os.path.dirname(files[0]) if files else ""
        self._open: list[WeightsFile] = []
        try:
            handles = {}
            for file in files:
                handles[file] = WeightsFile(file)
                self._open.append(handles[file])
        except BaseException:
            self.close()
            raise
        self._entries: dict[str, object] = {}  # name -> (file, tensor name) or QuantizedSource
        parts = _parts(files)
        for file in files:
            for name in handles[file].names():
                module, _, leaf = name.rpartition(".")
                leaves = parts[module]
                if not _is_quantized(leaves) or leaf not in _PARTS + ("weight",):  # plain (or a bias beside one)
                    self._entries[name] = (handles[file], name)
                elif leaf in ("weight", "weight_packed"):
                    own = {k: (handles[f], n) for k, (f, n) in leaves.items() if k in _PARTS + ("weight",)}
                    self._entries[module + ".weight"] = QuantizedSource(cq, module, own)
                elif "weight" not in leaves and "weight_packed" not in leaves and leaf in _SCALES:
                    raise QuantFormatError(f"{name}: a scale with no quantized weight ({module}.weight or "
                                           f"{module}.weight_packed) beside it")

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        e = self._entries[name]
        return e.get_shape() if isinstance(e, QuantizedSource) else e[0].shape(e[1])

    def tensor(self, name: str):
        e = self._entries[name]
        return e if isinstance(e, QuantizedSource) else e[0].tensor(e[1])

    def nbytes(self, name: str) -> int:
        e = self._entries[name]
        return e.nbytes() if isinstance(e, QuantizedSource) else e[0].nbytes(e[1])

    def release(self, name: str) -> None:
        e = self._entries[name]
        e.release() if isinstance(e, QuantizedSource) else e[0].release(e[1])

    def close(self) -> None:
        for f in self._open:
            f.close()

    def __enter__(self) -> QuantizedCheckpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
