"""Hugging Face checkpoint layout (docs/model.md §4) and loading.

`checkpoint_layout(config)` is the one map of tensor names and shapes: the loader checks files
against it and the checkpoint writer writes it. `load_checkpoint` streams tensors from memory-mapped
safetensors files (weights_file.py) into the model's (possibly fused, stacked or sharded) parameters, one
tensor at a time, giving back each tensor's pages once copied, so peak memory stays near the size of the weights.
With quantization (quant/) each tensor is quantized as it arrives, or, from a pre-quantized checkpoint,
converted to the model's quantized format.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .config import Param2MoEConfig
from .mapped import RowPieces, map_weights
from .quant.formats import QuantFormatError
from .quant.loading import init_dummy, load_tensor, make_plan, materialize
from .quant.plan import input_widths
from .quant.prequantized import QuantizedCheckpoint, read_checkpoint_quant
from .weights_file import WeightsFile

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class CheckpointError(ValueError):
    """A checkpoint file or tensor is missing, unexpected or of the wrong shape; the message names it."""


# ---------------------------------------------------------------------------- the name map
def checkpoint_layout(cfg: Param2MoEConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of this config holds (MTP layers aside), with its shape."""
    h, d, v = cfg.hidden_size, cfg.head_size, cfg.vocab_size
    nh, nkv = cfg.num_attention_heads, cfg.num_kv_heads
    out: dict[str, tuple[int, ...]] = {"model.word_embeddings.weight": (v, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (v, h)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "post_attention_layernorm.weight"] = (h,)
        out[p + "attention.query_key_value.weight"] = ((nh + 2 * nkv) * d, h)
        if cfg.use_qkv_bias:
            out[p + "attention.query_key_value.bias"] = ((nh + 2 * nkv) * d,)
        out[p + "attention.dense.weight"] = (h, nh * d)
        if cfg.use_bias:
            out[p + "attention.dense.bias"] = (h,)
        if cfg.use_qk_norm:
            out[p + "attention.query_layernorm.weight"] = (d,)
            out[p + "attention.key_layernorm.weight"] = (d,)
        if cfg.is_dense_layer(i):
            out.update(_swiglu(p + "mlp.", h, cfg.intermediate_size))
            continue
        e, im = cfg.num_experts, cfg.moe_intermediate_size
        out[p + "mlp.gate.weight"] = (e, h)
        if cfg.moe_router_enable_expert_bias:
            out[p + "mlp.gate.expert_bias"] = (e,)
        for j in range(e):
            out.update(_swiglu(f"{p}mlp.experts.{j}.", h, im))
        if cfg.shared_expert_intermediate_size:
            out.update(_swiglu(p + "mlp.shared_experts.", h, cfg.shared_expert_intermediate_size))
    return out


def _swiglu(prefix: str, hidden: int, width: int) -> dict[str, tuple[int, ...]]:
    return {prefix + "gate_proj.weight": (width, hidden), prefix + "up_proj.weight": (width, hidden),
            prefix + "down_proj.weight": (hidden, width)}


@dataclass
class Target:
    """Where a checkpoint tensor goes: (destination view, index of the checkpoint tensor) pairs."""

    parts: list[tuple[torch.Tensor, tuple]]


def _rows(start: int, size: int) -> tuple:
    return (slice(start, start + size),)


def _cols(start: int, size: int) -> tuple:
    return (slice(None), slice(start, start + size))


def load_targets(model) -> dict[str, Target]:
    """Map each checkpoint tensor this rank needs onto its parameters (fused, stacked, sharded)."""
    cfg, shard = model.config, model.shard
    t: dict[str, Target] = {}
    m = model.model
    if shard.is_first_stage or (cfg.tie_word_embeddings and shard.is_last_stage):
        w = m.word_embeddings.weight
        t["model.word_embeddings.weight"] = Target([(w, _rows(m.vocab_start, w.shape[0]))])
    if shard.is_last_stage:
        t["model.norm.weight"] = Target([(m.norm.weight, ())])
        if model.lm_head is not None:  # (a quantized tied head: a quantized copy of the embedding matrix)
            w = model.lm_head.weight
            source = "model.word_embeddings.weight" if cfg.tie_word_embeddings else "lm_head.weight"
            t.setdefault(source, Target([])).parts.append((w, _rows(m.vocab_start, w.shape[0])))
    for i in m.layer_range:
        try:
            t.update(_layer_targets(model, i))
        except QuantFormatError as e:  # a quantized weight cut where its scales do not allow (fused parts, TP)
            raise QuantFormatError(f"model.layers.{i}: {e}") from None
    return t


def _layer_targets(model, i: int) -> dict[str, Target]:
    """load_targets' part for layer i."""
    cfg, shard, d = model.config, model.shard, model.config.head_size
    t: dict[str, Target] = {}
    layer, p = model.model.layers[str(i)], f"model.layers.{i}."
    t[p + "input_layernorm.weight"] = Target([(layer.input_layernorm.weight, ())])
    t[p + "post_attention_layernorm.weight"] = Target([(layer.post_attention_layernorm.weight, ())])
    att = layer.attention
    q, kv = att.num_heads * d, att.num_kv_heads * d
    q_src = shard.tp_rank * q
    kv_src = shard.kv_head_start(cfg.num_kv_heads) * d
    nh_total = cfg.num_attention_heads * d
    nkv_total = cfg.num_kv_heads * d
    for suffix, tensor in (("weight", att.query_key_value.weight), ("bias", att.query_key_value.bias)):
        if tensor is None:
            continue
        t[p + "attention.query_key_value." + suffix] = Target([
            (tensor[:q], _rows(q_src, q)),
            (tensor[q:q + kv], _rows(nh_total + kv_src, kv)),
            (tensor[q + kv:], _rows(nh_total + nkv_total + kv_src, kv)),
        ])
    t[p + "attention.dense.weight"] = Target([(att.dense.weight, _cols(q_src, q))])
    if att.dense.bias is not None:
        t[p + "attention.dense.bias"] = Target([(att.dense.bias, ())])
    if att.query_layernorm is not None:
        t[p + "attention.query_layernorm.weight"] = Target([(att.query_layernorm.weight, ())])
        t[p + "attention.key_layernorm.weight"] = Target([(att.key_layernorm.weight, ())])
    if cfg.is_dense_layer(i):
        t.update(_swiglu_targets(p + "mlp.", layer.mlp.gate_up_proj, layer.mlp.down_proj, shard.tp_rank))
        return t
    moe = layer.mlp
    t[p + "mlp.gate.weight"] = Target([(moe.gate.weight, ())])
    if moe.gate.expert_bias is not None:
        t[p + "mlp.gate.expert_bias"] = Target([(moe.gate.expert_bias, ())])
    width_rank = 0 if shard.expert_parallel else shard.tp_rank
    for slot, j in enumerate(moe.slot_experts):  # a replicated expert (eplb) fills each of its slots
        w13, w2 = (w if isinstance(w, RowPieces) else w[slot] for w in (moe.w13, moe.w2))
        for name, target in _swiglu_targets(f"{p}mlp.experts.{j}.", w13, w2, width_rank).items():
            t.setdefault(name, Target([])).parts.extend(target.parts)
    if moe.shared_experts is not None:
        s = moe.shared_experts
        t.update(_swiglu_targets(p + "mlp.shared_experts.", s.gate_up_proj, s.down_proj, shard.tp_rank))
    return t


def _swiglu_targets(prefix: str, gate_up, down, rank: int) -> dict[str, Target]:
    """The targets of a gated MLP's three tensors; none for a weight mapped in pieces (mapped.RowPieces)."""
    w, t = down.shape[-1], {}
    if not isinstance(gate_up, RowPieces):
        t[prefix + "gate_proj.weight"] = Target([(gate_up[:w], _rows(rank * w, w))])
        t[prefix + "up_proj.weight"] = Target([(gate_up[w:], _rows(rank * w, w))])
    if not isinstance(down, RowPieces):
        t[prefix + "down_proj.weight"] = Target([(down, _cols(rank * w, w))])
    return t


# ---------------------------------------------------------------------------- files
def weight_files(path: str) -> list[str]:
    """The safetensors files of a checkpoint directory (one file, or the shards of the index)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        missing = [s for s in shards if not os.path.exists(os.path.join(path, s))]
        if missing:
            raise CheckpointError(f"{index} names shard file(s) that do not exist: {', '.join(missing)}")
        return [os.path.join(path, s) for s in shards]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if files:
        return [os.path.join(path, f) for f in files]
    pickles = sorted(f for f in os.listdir(path) if f.endswith(_PICKLE_SUFFIXES))
    if pickles:
        raise CheckpointError(
            f"{path} holds only pickle weight files ({', '.join(pickles)}); param2moe loads safetensors only, "
            "because unpickling can run arbitrary code. Convert the checkpoint to safetensors first.")
    raise CheckpointError(f"{path} holds no *.safetensors weight files")


_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def _is_mtp(name: str, cfg: Param2MoEConfig) -> bool:
    m = _LAYER.match(name)
    return m is not None and int(m.group(1)) >= cfg.num_hidden_layers


def open_weights(path: str, files: list[str]) -> Iterator[WeightsFile | QuantizedCheckpoint]:
    """Each weight file, open in turn; a pre-quantized checkpoint's files all at once, as one reader whose
    quantized modules' tensors (codes, scales: quant/prequantized.py) come as one `<module>.weight` each."""
    quantized = read_checkpoint_quant(path)
    if quantized is not None:
        with QuantizedCheckpoint(quantized, files) as f:
            yield f
        return
    for file in files:
        with WeightsFile(file) as f:
            yield f


def iter_checkpoint_tensors(path: str) -> Iterator[tuple[str, str, WeightsFile | QuantizedCheckpoint]]:
    """(file, name, the open file) for every tensor of every file, memory-mapped, nothing read yet."""
    for f in open_weights(path, weight_files(path)):
        for name in f.names():
            yield f.path, name, f


def resolve_shared_width(cfg: Param2MoEConfig, path: str) -> Param2MoEConfig:
    """docs/model.md §3.4: the checkpoint's shared-expert shape is the truth. Accept a width that matches either
    rule (moe_shared_expert_intermediate_size as the total, or moe_intermediate_size * num_shared_experts)
    and record it in the config; a width that matches neither is an error naming both."""
    if not cfg.shared_expert_intermediate_size:
        return cfg
    layer = next((i for i in range(cfg.num_hidden_layers) if not cfg.is_dense_layer(i)), None)
    if layer is None:  # dense layers only: no shared expert to look at
        return cfg
    name = f"model.layers.{layer}.mlp.shared_experts.gate_proj.weight"
    for file, tensor_name, f in iter_checkpoint_tensors(path):
        if tensor_name != name:
            continue
        width = f.shape(name)[0]
        rules = {"moe_shared_expert_intermediate_size": cfg.moe_shared_expert_intermediate_size,
                 "moe_intermediate_size * num_shared_experts": cfg.moe_intermediate_size * cfg.num_shared_experts}
        if width == cfg.shared_expert_intermediate_size:
            return cfg
        if width in rules.values():
            cfg.moe_shared_expert_intermediate_size = width
            return cfg
        raise CheckpointError(
            f"tensor {name!r} in {os.path.basename(file)} is {width} wide, which matches neither rule for the "
            f"shared-expert width: " + ", ".join(f"{k} = {v}" for k, v in rules.items()))
    return cfg  # absent: load_checkpoint reports it as missing


def load_checkpoint(model, path: str, progress: bool = True, mapped: frozenset = frozenset()) -> None:
    """Fill the model's parameters from the checkpoint at `path`, checking every name and shape. Each tensor
    goes from the memory-mapped file straight into its parameters (no copy of a file, nor of a tensor, in
    between), and its pages of the mapping are released once copied. mapped: names whose tensors the model
    already holds as views of the files (mapped.py), checked and not copied."""
    from tqdm import tqdm

    cfg = model.config
    layout = checkpoint_layout(cfg)
    targets = load_targets(model)
    found: set[str] = set()
    files = weight_files(path)
    total = sum(os.path.getsize(f) for f in files)
    with tqdm(total=total, desc="Loading weights", unit="B", unit_scale=True, disable=not progress) as bar:
        for f in open_weights(path, files):
            bar.set_postfix_str(os.path.basename(f.path), refresh=False)
            for name in f.names():
                _load_tensor(f, name, layout, targets, found, cfg, mapped)
                bar.update(f.nbytes(name))
        bar.update(total - bar.n)  # the files' headers
    missing = [n for n in layout if n not in found]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(
            f"{len(missing)} tensor(s) missing from {', '.join(os.path.basename(f) for f in files)}: "
            f"{', '.join(missing[:5])}{more}")
    _center_expert_bias(model)


def _load_tensor(f: WeightsFile | QuantizedCheckpoint, name: str, layout: dict, targets: dict, found: set,
                 cfg: Param2MoEConfig, mapped: frozenset = frozenset()) -> None:
    if _is_mtp(name, cfg) or (name == "lm_head.weight" and cfg.tie_word_embeddings):
        return  # multi-token-prediction layers and a redundant tied head are not used
    where = os.path.basename(f.path)
    if name not in layout:
        raise CheckpointError(f"unexpected tensor {name!r} in {where}: not part of this config's model")
    shape = f.shape(name)
    if shape != layout[name]:
        raise CheckpointError(f"tensor {name!r} in {where} has shape {list(shape)}, expected {list(layout[name])}")
    if name in found:
        raise CheckpointError(f"tensor {name!r} appears twice (again in {where})")
    found.add(name)
    target = targets.get(name)
    if target is None or name in mapped:  # held by another rank or pipeline stage, or mapped already
        return
    load_tensor(name, target.parts, f.tensor(name))  # (quantized where the destination is)
    f.release(name)


def _center_expert_bias(model) -> None:
    # A constant added to every expert bias changes no choice (docs/model.md §3.4); centring keeps it small
    # next to the scores in fp32.
    for module in model.modules():
        bias = getattr(getattr(module, "gate", None), "expert_bias", None)
        if isinstance(bias, torch.Tensor):
            bias.sub_(bias.mean())


def init_dummy_weights(model, seed: int = 0, std: float = 0.02) -> None:
    """Random weights straight from the config (no files): for benchmarks of real shapes."""
    gen = torch.Generator(device=model.model.norm.weight.device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith(("bias", "expert_bias")):
            p.zero_()
        else:
            p.normal_(0.0, std, generator=gen)
    init_dummy(model, seed, std)  # quantized weights: random codes, one matrix at a time


def _materialize(model: torch.nn.Module, device) -> None:
    """Give every meta parameter and buffer uninitialised storage on `device` (what Module.to_empty does,
    without its empty_like on meta tensors, whose first call imports sympy: a third of a second)."""
    made: dict[int, torch.Tensor] = {}  # a tensor shared by several modules stays shared
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if t is None or not t.is_meta:
                    continue
                if id(t) not in made:
                    new = torch.empty(t.shape, dtype=t.dtype, device=device)
                    made[id(t)] = torch.nn.Parameter(new, requires_grad=t.requires_grad) \
                        if isinstance(t, torch.nn.Parameter) else new
                table[name] = made[id(t)]


def load_model(path: str | None, dtype=torch.bfloat16, device="cpu", shard=None, *, config=None,
               dummy: bool = False, seed: int = 0, progress: bool = True, kernels=None,
               quantization: str | None = None, quantize_head: bool = False, mmap_weights: bool = False):
    """Build the network on `device` and fill it from the checkpoint at `path` (or randomly, `dummy`);
    kernels: the backend of its hot ops (param2moe.kernels.Kernels; default: "auto"); quantization:
    quant.plan.OPTIONS (None: as the checkpoint is); quantize_head: the output head too; mmap_weights: on the
    CPU with one rank, weights in the model's dtype stay views of the memory-mapped files (mapped.py)."""
    from .model import Param2MoEForCausalLM

    cfg = config or Param2MoEConfig.from_pretrained(path)
    if not dummy:
        cfg = resolve_shared_width(cfg, path)
    plan = make_plan(quantization, path, quantize_head, None if dummy else weight_files(path),
                     widths=input_widths(cfg, shard))
    with torch.device("meta"):
        model = Param2MoEForCausalLM(cfg, dtype=dtype, shard=shard, kernels=kernels, quant=plan)
    mapped = frozenset()
    if mmap_weights and not dummy and torch.device(device).type == "cpu" and _one_rank(model.shard):
        mapped = _map_files(model, path)
    _materialize(model, device)
    materialize(model, device)
    with torch.no_grad():
        if dummy:
            init_dummy_weights(model, seed)
        else:
            load_checkpoint(model, path, progress=progress, mapped=mapped)
    return model.eval()


def _one_rank(shard) -> bool:
    return shard.tp_size == 1 and shard.pp_size == 1 and not shard.num_redundant_experts


def _map_files(model, path: str) -> frozenset:
    """mapped.map_weights over the checkpoint's files (none where it is pre-quantized); the files holding mapped
    tensors stay open, kept on the model as `mapped_files`."""
    if read_checkpoint_quant(path) is not None:  # (its config says so)
        return frozenset()
    opened = [WeightsFile(f) for f in weight_files(path)]
    by_name = {name: f for f in opened for name in f.names()}
    mapped = map_weights(model, by_name)
    holding = {id(by_name[n]) for n in mapped}
    model.mapped_files = [f for f in opened if id(f) in holding]
    for f in opened:
        if id(f) not in holding:
            f.close()
    return frozenset(mapped)
