"""Weights left in the checkpoint's memory-mapped safetensors files instead of copied into the model (CPU loads,
as llama.cpp maps its GGUF): the model's tensors are views of the files' pages, which the page cache holds once
for every process and may drop and read again, rather than private memory the size of the model.

A weight the checkpoint stores as one tensor becomes a view of it (the embedding, attention's fused QKV and output
projection, an MLP's down projection). The model holds some weights fused or stacked that the checkpoint stores in
pieces: a gated MLP's gate and up rows in one [2I, H] matrix, the routed experts as [E, 2I, H] and [E, H, I]
stacks. Those become `RowPieces`, the pieces' views in order, which the kernels take as they are: the native ones
through a table of the pieces' addresses, the torch path a matmul a piece.

What is mapped: on the CPU, one rank, a checkpoint that is not pre-quantized, weights the model keeps in the
file's dtype (quantized ones are computed, so copied); LoRA and expert load balancing write into or beside the
weights, so the engine copies when either is on (`EngineConfig.mmap_weights`). Norms, the router and biases are
small and copied (the router is kept in float32). Mapped weights are read-only memory: nothing may write into
them. The batched matmuls' oneDNN packed copies (kernels/matmul.py: a speed cache of at most a quarter of the
machine's memory, `P2M_CPU_ONEDNN=0` turns it off) are made of mapped weights as of copied ones: bf16 matmuls of
many rows are much slower unpacked (README, "On a CPU").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class RowPieces:
    """A weight [N, K], or a stack of E of them [E, N, K] (`stacked`), whose rows are in pieces: pieces[e] the
    row blocks of matrix e in order (a gated MLP's gate rows, then its up rows), each a [n_i, K] tensor."""

    def __init__(self, pieces: list[list[torch.Tensor]], stacked: bool):
        first = pieces[0]
        rows = [p.shape[0] for p in first]
        if any([p.shape[0] for p in m] != rows or any(p.shape[1:] != first[0].shape[1:] for p in m) for m in pieces):
            raise ValueError("RowPieces: every matrix must be cut into pieces of the same shapes")
        if not stacked and len(pieces) != 1:
            raise ValueError("RowPieces: an unstacked weight is one matrix")
        self.pieces, self.stacked = pieces, stacked
        n, k = sum(rows), first[0].shape[1]
        self.shape = torch.Size((len(pieces), n, k) if stacked else (n, k))
        self.dtype, self.device = first[0].dtype, first[0].device
        self._table = self._stack = None

    def dim(self) -> int:
        return len(self.shape)

    def as_stack(self) -> RowPieces:
        """This matrix as a stack of one ([1, N, K]): a dense MLP run as one expert (kept, with its table)."""
        if self.stacked:
            return self
        if self._stack is None:
            self._stack = RowPieces(self.pieces, stacked=True)
        return self._stack

    def matrix(self, index: int | None = None) -> list[torch.Tensor]:
        """The pieces of matrix `index` (of the only matrix when unstacked)."""
        return self.pieces[0 if index is None else index]

    def linear(self, x: torch.Tensor, index: int | None = None, bias: torch.Tensor | None = None,
               linear=F.linear) -> torch.Tensor:
        """x @ W.T (+ bias), W the matrix `index`: one matmul a piece (`linear(x, piece)`), joined by columns."""
        y = torch.cat([linear(x, p) for p in self.matrix(index)], dim=-1)
        return y if bias is None else y + bias

    def pointer_table(self) -> torch.Tensor:
        """The pieces' addresses, matrix by matrix, in an int64 tensor (the native kernels' table; kept)."""
        if self._table is None:
            self._table = torch.tensor([p.data_ptr() for m in self.pieces for p in m], dtype=torch.int64)
        return self._table

    def pieces_per_matrix(self) -> int:
        return len(self.pieces[0])

    def contiguous_copy(self) -> torch.Tensor:
        """The weight as one tensor (a copy)."""
        mats = [torch.cat(m) for m in self.pieces]
        return torch.stack(mats) if self.stacked else mats[0]

    def __repr__(self) -> str:
        return f"RowPieces(shape={list(self.shape)}, dtype={self.dtype}, pieces per matrix={self.pieces_per_matrix()})"


def map_weights(model, files: dict) -> set[str]:
    """Put views of the checkpoint's tensors in place of the model's (still meta) weights where they can be.
    files: {tensor name: an open weights_file.WeightsFile holding it}. Returns the names now mapped (the loader
    copies the others). A weight is left to the loader when its tensors are missing, misshapen (the loader says
    which), of another dtype, or not aligned to their element size."""
    cfg, mapped = model.config, set()

    def view(name: str, shape: tuple, dtype) -> torch.Tensor | None:
        f = files.get(name)
        if f is None or f.shape(name) != tuple(shape) or f.dtype(name) != dtype:
            return None
        t = f.tensor(name)
        return t if t.data_ptr() % t.element_size() == 0 else None

    def one(module, attr: str, name: str) -> None:
        p = getattr(module, attr, None)
        if isinstance(p, torch.nn.Parameter) and p.is_meta and (t := view(name, p.shape, p.dtype)) is not None:
            module._parameters[attr] = torch.nn.Parameter(t, requires_grad=False)
            mapped.add(name)

    def pieces(module, attr: str, names: list[list[str]], stacked: bool) -> None:
        p = getattr(module, attr, None)
        if not (isinstance(p, torch.nn.Parameter) and p.is_meta):
            return
        rows = p.shape[-2] // len(names[0])
        views = [[view(n, (rows, p.shape[-1]), p.dtype) for n in m] for m in names]
        if any(v is None for m in views for v in m):
            return
        delattr(module, attr)
        setattr(module, attr, RowPieces(views, stacked))
        mapped.update(n for m in names for n in m)

    def mlp(module, prefix: str) -> None:
        pieces(module, "gate_up_proj", [[prefix + "gate_proj.weight", prefix + "up_proj.weight"]], stacked=False)
        one(module, "down_proj", prefix + "down_proj.weight")

    one(model.model.word_embeddings, "weight", "model.word_embeddings.weight")
    if model.lm_head is not None:
        one(model.lm_head, "weight", "lm_head.weight")
    for i, layer in model.model.layers.items():
        p = f"model.layers.{i}."
        one(layer.attention.query_key_value, "weight", p + "attention.query_key_value.weight")
        one(layer.attention.dense, "weight", p + "attention.dense.weight")
        m = layer.mlp
        if cfg.is_dense_layer(int(i)):
            mlp(m, p + "mlp.")
            continue
        experts = [f"{p}mlp.experts.{j}." for j in m.slot_experts]
        pieces(m, "w13", [[e + "gate_proj.weight", e + "up_proj.weight"] for e in experts], stacked=True)
        pieces(m, "w2", [[e + "down_proj.weight"] for e in experts], stacked=True)
        if m.shared_experts is not None:
            mlp(m.shared_experts, p + "mlp.shared_experts.")
    return mapped
