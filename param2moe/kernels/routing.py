"""MoE routing (docs/model.md §3.4), plain torch, for a whole batch of tokens. The oracle of the Triton version."""

from __future__ import annotations

import torch

from .norm import add_rms_norm


def route(
    logits: torch.Tensor,
    expert_bias: torch.Tensor | None,
    top_k: int,
    *,
    score_function: str = "sigmoid",
    n_group: int | None = None,
    topk_group: int | None = None,
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
    num_appended: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose experts. logits: [T, E] float32. Returns (weights [T, K] float32, ids [T, K] int64), and
    num_appended more columns: experts E, E+1, ... with weight 1 for every token (the shared expert's
    pieces when it is folded into the routed experts: MoE.fold_shared_experts)."""
    logits = logits.float()
    scores = logits.sigmoid() if score_function == "sigmoid" else logits.softmax(dim=-1)
    choice = scores if expert_bias is None else scores + expert_bias.float()
    if n_group is not None and topk_group is not None and n_group > 1:
        t, e = choice.shape
        grouped = choice.view(t, n_group, e // n_group)
        # A group's score is the sum of its two best choice scores (its best, if it has one expert).
        group_score = grouped.topk(min(2, e // n_group), dim=-1).values.sum(-1)
        kept = group_score.topk(topk_group, dim=-1).indices
        keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, kept, True)
        choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(t, e)
    ids = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, ids)  # the unbiased scores weight the experts
    if norm_topk_prob:
        weights = weights / weights.sum(-1, keepdim=True)
    return append_experts(weights * routed_scaling_factor, ids, logits.shape[1], num_appended)


def gate_route(x: torch.Tensor, gate_weight: torch.Tensor, expert_bias: torch.Tensor | None, top_k: int, **kw):
    """The router: fp32 logits x @ gate_weight.T (x read as fp32, docs/model.md §3.4), then `route`."""
    return route(torch.nn.functional.linear(x.float(), gate_weight), expert_bias, top_k, **kw)


def add_rms_norm_gate_route(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                            gate_weight: torch.Tensor, expert_bias: torch.Tensor | None, top_k: int, **kw):
    """The MoE layer's input: (normed, residual', weights, ids) = add_rms_norm, then the router on it."""
    normed, residual = add_rms_norm(x, residual, norm_weight, eps)
    return (normed, residual, *gate_route(normed, gate_weight, expert_bias, top_k, **kw))


def append_experts(weights: torch.Tensor, ids: torch.Tensor, first: int, n: int):
    """Every token (row) also takes experts first .. first+n-1, with weight 1."""
    if not n:
        return weights, ids
    ids = torch.cat([ids, torch.arange(first, first + n, device=ids.device).expand(ids.shape[0], -1)], dim=1)
    return torch.cat([weights, weights.new_ones(weights.shape[0], n)], dim=1), ids


def map_experts(ids: torch.Tensor, table: torch.Tensor, counts: torch.Tensor, num_physical: int,
                load: torch.Tensor | None = None, slots: torch.Tensor | None = None, padding_slot: int = -1,
                local: tuple[int, int] | None = None) -> torch.Tensor:
    """Logical expert ids [T, K] -> physical ones (expert load balancing, param2moe/eplb): pair i = t*K + k
    takes replica i % counts[e] of its expert e, table[e, i % counts[e]] (table [L, R]: each expert's physical
    slots). Ids >= L (the folded shared expert's pieces) become num_physical + (id - L). load [L], when given,
    counts each pair's logical expert, except rows whose KV slot (slots [T]) is the padding slot (CUDA-graph
    padding). local = (start, end): the ids as this rank's slots, -1 for slots it does not hold."""
    t, k = ids.shape
    num_logical = table.shape[0]
    routed = ids < num_logical
    logical = torch.where(routed, ids, 0)
    if load is not None:
        counted = routed if slots is None else routed & (slots != padding_slot)[:, None]
        load.index_add_(0, logical.reshape(-1), counted.reshape(-1).to(load.dtype))
    pair = torch.arange(t * k, device=ids.device).view(t, k)
    replica = pair % counts[logical]
    phys = torch.where(routed, table[logical, replica], ids - num_logical + num_physical)
    if local is not None:
        start, end = local
        phys = torch.where((phys >= start) & (phys < end), phys - start, -1)
    return phys
