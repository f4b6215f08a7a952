"""Which of the model's weights are quantized, and how: from the `quantization` option (quantized while the
checkpoint streams in) or from a pre-quantized checkpoint's quantization_config (quant/prequantized.py).

Quantized: attention's query_key_value and dense, the dense layers' MLP, the shared and the routed experts
(every gate_proj, up_proj and down_proj of the checkpoint); the output head only when asked (`head`). The
router, the norms and the embeddings stay in the model's dtype.

Options (the one list the CLI and the engine take):
  int8       weight-only, symmetric, one scale per output channel
  int4       weight-only, symmetric, one scale per group of 128 input columns (`int4_group`: a smaller power of
             two, down to 32, for a model whose input widths 128 does not divide)
  fp8        float8 e4m3 weights, one scale per output channel
  fp8-block  float8 e4m3 weights, one scale per 128x128 block (the DeepSeek-V3 / Qwen3-FP8 layout)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .formats import INT4_GROUP, QuantFormatError, QuantizedWeight, empty
from .layout import quantize_in_rows

OPTIONS = ("int8", "int4", "fp8", "fp8-block")

# Checkpoint weights that are quantized (their module names end so); the head (lm_head) only when asked.
_QUANTIZABLE = re.compile(r"\.(attention\.query_key_value|attention\.dense|gate_proj|up_proj|down_proj)$")
HEAD = "lm_head"


def quantizable(module: str, head: bool = False) -> bool:
    """Whether the checkpoint module `module` (a tensor name without `.weight`) is one that gets quantized."""
    return bool(_QUANTIZABLE.search(module)) or (head and module == HEAD)


def input_widths(cfg, shard=None) -> list[int]:
    """The input widths (K, per rank) of the matrices a plan quantizes: the hidden size (qkv, the MLPs' gate/up,
    the experts' gate/up, the head), and the widths each rank's row-parallel slice takes (attention's dense,
    the down projections)."""
    tp = shard.tp_size if shard is not None else 1
    widths = [cfg.hidden_size, cfg.num_attention_heads // tp * cfg.head_size, cfg.intermediate_size // tp]
    if cfg.is_moe:
        widths.append(shard.local_expert_width(cfg.moe_intermediate_size) if shard is not None
                      else cfg.moe_intermediate_size)
        if cfg.shared_expert_intermediate_size:
            widths.append(cfg.shared_expert_intermediate_size // tp)
    return widths


def int4_group(widths: list[int], preferred: int = INT4_GROUP) -> int:
    """int4's group for matrices of these input widths: `preferred` where it divides every one, else the largest
    power of two below it that does, down to 32 (more scales, weights at least as close); else `preferred`, and
    the first matrix it does not fit is named when the model is built."""
    group = preferred
    while group >= 32:
        if all(w % group == 0 for w in widths):
            return group
        group //= 2
    return preferred


def option_of(qw: QuantizedWeight) -> str:
    """The option name a quantized weight was made with."""
    return "fp8-block" if qw.block else qw.method


@dataclass(frozen=True)
class QuantPlan:
    option: str  # one of OPTIONS
    head: bool = False  # quantize the output head too
    group_size: int = INT4_GROUP  # int4: input columns per scale (0: one group of the whole row)
    stored: frozenset[str] | None = None  # pre-quantized: the checkpoint modules stored quantized; None: online

    def __post_init__(self):
        if self.option not in OPTIONS:
            raise QuantFormatError(f"quantization={self.option!r}: expected one of {', '.join(OPTIONS)}")

    @property
    def method(self) -> str:
        return "fp8" if self.option == "fp8-block" else self.option

    @property
    def block(self) -> bool:
        return self.option == "fp8-block"

    def quantizes(self, modules: list[str]) -> bool:
        """Whether the weight filled from these checkpoint modules is held quantized. Online: every one
        (the head if asked). Pre-quantized: those the checkpoint stores quantized (a fused weight whose other
        parts are stored in high precision is quantized at load), and the head if asked."""
        if modules == [HEAD] and self.head:
            return True
        if self.stored is None:
            return modules != [HEAD]
        return any(m in self.stored for m in modules)

    def empty(self, shape, name: str = "weight", device=None) -> QuantizedWeight:
        """An uninitialised weight of this plan's format; name (for errors): the checkpoint module it holds."""
        try:
            return empty(shape, self.method, group_size=self._group(shape), block=self.block, device=device)
        except QuantFormatError as e:
            raise QuantFormatError(f"{name}: {e}") from None

    def quantize(self, w) -> QuantizedWeight:
        return quantize_in_rows(w, self.method, group_size=self._group(w.shape), block=self.block)

    def _group(self, shape) -> int:
        return self.group_size or shape[-1]
