"""Block-size configs of the fused MoE, keyed by token-count bucket.

`moe_configs.json` beside this file holds the tables tuned on the lent GPUs (benchmarks/gpu_kernels.py
writes them): {card: {shape_key: {bucket: config}}}, card "H100" / "H200", shape_key
"E{E}_H{H}_I{I}_K{K}_{dtype}", bucket the largest token count the config was tuned at; a batch of T
tokens takes the config of the smallest bucket >= T (the largest bucket beyond). A shape or card with
no table falls back to `default_config`. A config:
    {"BLOCK_M": 16, "gate_up": {"BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages"}, "down": {...}}
(BLOCK_M is shared: both GEMMs walk the same expert-aligned slot blocks).
"""

from __future__ import annotations

import functools
import json
import os
import re

import torch

_TABLE_PATH = os.path.join(os.path.dirname(__file__), "moe_configs.json")


def _gemm(bn, bk, group_m, warps, stages):
    return {"BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m, "num_warps": warps, "num_stages": stages}


def default_config(t: int, topk: int = 6) -> dict:
    """Untuned guesses: small M tiles and wide K tiles while decode is bandwidth bound, then
    tensor-core sized tiles with grouped M ordering for prefill."""
    pairs = t * topk
    if pairs <= 96:
        return {"BLOCK_M": 16, "gate_up": _gemm(64, 128, 1, 4, 4), "down": _gemm(64, 128, 1, 4, 4)}
    if pairs <= 768:
        return {"BLOCK_M": 16, "gate_up": _gemm(64, 128, 1, 4, 3), "down": _gemm(64, 128, 1, 4, 3)}
    if pairs <= 3072:
        return {"BLOCK_M": 32, "gate_up": _gemm(64, 64, 8, 4, 4), "down": _gemm(128, 64, 8, 4, 4)}
    return {"BLOCK_M": 64, "gate_up": _gemm(64, 64, 8, 4, 4), "down": _gemm(128, 64, 8, 4, 4)}


def shape_key(e: int, h: int, i: int, k: int, dtype) -> str:
    return f"E{e}_H{h}_I{i}_K{k}_{str(dtype).replace('torch.', '')}"


@functools.cache
def _tables() -> dict:
    try:
        with open(_TABLE_PATH) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


@functools.cache
def card_name(index: int | None = None) -> str:
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name(index)
    for card in ("H200", "H100", "A100", "L40S", "B200"):
        if card in name:
            return card
    return name


def _nearest_shape(tables: dict, e: int, h: int, i: int, k: int, dtype) -> dict | None:
    """The table of the same H, I and dtype with the nearest expert count, then top-k (the fused MoE
    with the shared expert folded in runs 64 + 2 experts, top 6 + 2, on the 64 x top-6 table)."""
    pattern = re.escape(shape_key(0, h, i, 0, dtype)).replace("E0", r"E(\d+)").replace("K0", r"K(\d+)")
    best = None
    for key, table in tables.items():
        m = re.fullmatch(pattern, key)
        if m:
            score = (abs(int(m[1]) - e), abs(int(m[2]) - k))
            if best is None or score < best[0]:
                best = (score, table)
    return best[1] if best else None


@functools.lru_cache(maxsize=4096)
def get_config(t: int, e: int, h: int, i: int, k: int, dtype) -> dict:
    tables = _tables()
    card = card_name()
    key = shape_key(e, h, i, k, dtype)
    table = tables.get(card, {}).get(key)
    if table is None and card in ("H100", "H200"):  # the same chip with other memory: the other's table
        table = tables.get("H200" if card == "H100" else "H100", {}).get(key)
    if table is None:
        table = _nearest_shape(tables.get(card, {}), e, h, i, k, dtype)
    if not table:
        return default_config(t, k)
    buckets = sorted(int(b) for b in table)
    chosen = next((b for b in buckets if b >= t), buckets[-1])
    return table[str(chosen)]
