"""Adapter slots in the network: for every adapted module, stacked A and B tensors of max_loras slots of
rank max_lora_rank (fixed sizes, so CUDA graphs capture them once), and the hooks the network calls.

The network fuses and stacks what the checkpoint keeps apart, so an adapter's modules land as:
- attention `query_key_value`, `dense`: one slice each;
- `gate_proj` and `up_proj` (dense layer, shared experts): slices 0 and 1 of the fused `gate_up_proj`;
  `down_proj` one slice;
- routed experts `mlp.experts.J.*`: bucket slot * E + J of the layer's expert stacks (only with
  routed_experts on: they take E times the memory of the rest).
A slot holds each module's A zero-padded to the slot rank and B times the adapter's scale; what an
adapter does not target stays zero. Each step the model hands its tokens' slots (`begin`); the hooks
then add every row's delta through `Kernels.add_lora` (Triton on CUDA, plain torch elsewhere).
"""

from __future__ import annotations

import re

import torch

from ..kernels import AUTO, Kernels
from ..kernels.lora import ExpertLoRA
from .adapter import LoRAAdapter, LoRAError

_NAME = re.compile(r"^(?P<prefix>model\.layers\.\d+\.(?:attention|mlp(?:\.shared_experts|\.experts)?))\."
                   r"(?:(?P<expert>\d+)\.)?(?P<leaf>\w+)$")
_FUSED = {"gate_proj": ("gate_up", 0), "up_proj": ("gate_up", 1), "down_proj": ("down", 0),
          "query_key_value": ("query_key_value", 0), "dense": ("dense", 0)}


def placement(module: str) -> tuple[str, int, int | None]:
    """(key of the slot tensors, slice, expert or None) of a checkpoint module name."""
    m = _NAME.match(module)
    if m is None or m["leaf"] not in _FUSED:
        raise KeyError(module)
    part, j = _FUSED[m["leaf"]]
    return f"{m['prefix']}.{part}", j, None if m["expert"] is None else int(m["expert"])


class SlotWeights:
    """a [NB, S, R, in], b [NB, S, out, R] of one network module (NB = slots, or slots * experts)."""

    def __init__(self, buckets: int, slices: int, rank: int, in_features: int, out_features: int, dtype, device):
        self.a = torch.zeros(buckets, slices, rank, in_features, dtype=dtype, device=device)
        self.b = torch.zeros(buckets, slices, out_features, rank, dtype=dtype, device=device)


class LinearHook:
    """Adds the step's LoRA deltas to a projection's output: y = hook.add(x, y)."""

    def __init__(self, slots: LoRASlots, weights: SlotWeights):
        self.slots, self.weights = slots, weights

    def add(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        rows = self.slots.rows
        if rows is None:
            return y
        return self.slots.ops.add_lora(y, x, self.weights.a, self.weights.b, rows)


class ExpertsHook:
    """The routed experts' slot tensors, handed to kernels.moe_experts for the step (None: no LoRA)."""

    def __init__(self, slots: LoRASlots, gate_up: SlotWeights, down: SlotWeights):
        self.slots, self.gate_up, self.down = slots, gate_up, down

    def for_step(self) -> ExpertLoRA | None:
        if self.slots.token_slots is None:
            return None
        return ExpertLoRA(self.gate_up.a, self.gate_up.b, self.down.a, self.down.b, self.slots.token_slots)


class LoRASlots:
    def __init__(self, model, max_loras: int, max_rank: int, routed_experts: bool = False):
        self.max_loras, self.max_rank, self.routed_experts = max_loras, max_rank, routed_experts
        # the activations' dtype (weights may be quantized: their shapes are the logical ones)
        self.dtype, self.device = model.dtype, model.model.norm.weight.device
        self.weights: dict[str, SlotWeights] = {}
        self.num_experts: dict[str, int] = {}  # key of expert stacks -> experts per slot
        self.token_slots = self.rows = None
        self.ops: Kernels = AUTO  # the model's backend, handed over each step
        self._attach(model)
        model.lora = self

    def _new(self, key: str, slices: int, in_f: int, out_f: int, experts: int = 0):
        w = SlotWeights(self.max_loras * max(experts, 1), slices, self.max_rank, in_f, out_f, self.dtype, self.device)
        self.weights[key] = w
        if experts:
            self.num_experts[key] = experts
        return w

    def _mlp_hooks(self, prefix: str, mlp) -> None:
        width, hidden = mlp.down_proj.shape[1], mlp.down_proj.shape[0]
        mlp.lora_gate_up = LinearHook(self, self._new(f"{prefix}.gate_up", 2, hidden, width))
        mlp.lora_down = LinearHook(self, self._new(f"{prefix}.down", 1, width, hidden))

    def _attach(self, model) -> None:
        shard = model.shard
        if shard.tp_size > 1 or shard.pp_size > 1:
            raise LoRAError("enable_lora: LoRA runs on one rank only (tensor_parallel_size and "
                             "pipeline_parallel_size 1)")
        for i, layer in model.model.layers.items():
            p = f"model.layers.{i}"
            att = layer.attention
            for name in ("query_key_value", "dense"):
                w = getattr(att, name).weight
                hook = LinearHook(self, self._new(f"{p}.attention.{name}", 1, w.shape[1], w.shape[0]))
                setattr(att, "lora_qkv" if name == "query_key_value" else "lora_dense", hook)
            mlp = layer.mlp
            if not hasattr(mlp, "w13"):
                self._mlp_hooks(f"{p}.mlp", mlp)
                continue
            if mlp.num_folded_shared:
                raise LoRAError("enable_lora: the shared experts are folded into the routed experts; attach "
                                 "LoRA slots before fold_shared_experts (the engine does not fold with LoRA)")
            if mlp.shared_experts is not None:
                self._mlp_hooks(f"{p}.mlp.shared_experts", mlp.shared_experts)
            if self.routed_experts:
                if not isinstance(mlp.w13, torch.Tensor):
                    raise LoRAError("lora_routed_experts: adapters of quantized routed experts are not served "
                                     "(quantize without them, or serve adapters of the other modules)")
                e, two_i, hidden = mlp.w13.shape
                gu = self._new(f"{p}.mlp.experts.gate_up", 2, hidden, two_i // 2, experts=e)
                dn = self._new(f"{p}.mlp.experts.down", 1, two_i // 2, hidden, experts=e)
                mlp.lora_experts = ExpertsHook(self, gu, dn)

    # ------------------------------------------------------------------ per step
    def begin(self, token_slots: torch.Tensor | None, ops: Kernels = AUTO) -> None:
        """The step's tokens' slots [T] int32 (-1: the base model; None: no adapter in the step), and the
        kernels the model runs on."""
        self.token_slots, self.ops = token_slots, ops
        self.rows = None if token_slots is None else ops.lora_rows(token_slots, self.max_loras)

    # ------------------------------------------------------------------ slot contents
    def nbytes_per_slot(self) -> int:
        return sum((w.a.numel() + w.b.numel()) * w.a.element_size() for w in self.weights.values()) // self.max_loras

    def clear(self, slot: int) -> None:
        for key, w in self.weights.items():
            e = self.num_experts.get(key, 1)
            w.a[slot * e:(slot + 1) * e].zero_()
            w.b[slot * e:(slot + 1) * e].zero_()

    def load(self, slot: int, adapter: LoRAAdapter) -> None:
        """Put the adapter's weights into the slot (device copies, in stream order)."""
        if not 0 <= slot < self.max_loras:
            raise IndexError(f"slot {slot} of {self.max_loras}")
        self.clear(slot)
        for name, m in adapter.modules.items():
            key, j, expert = placement(name)
            w = self.weights.get(key)
            if w is None:
                raise ValueError(f"adapter {adapter.name!r}: module {name!r} has no slot here" +
                                 (" (start with lora_routed_experts on)" if expert is not None else ""))
            bucket = slot if expert is None else slot * self.num_experts[key] + expert
            with torch.no_grad():
                w.a[bucket, j, : m.rank].copy_(m.a)
                w.b[bucket, j, :, : m.rank].copy_(m.b * m.scale)
