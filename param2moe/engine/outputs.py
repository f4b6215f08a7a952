"""What the engine returns for a request (shaped like vLLM's RequestOutput / CompletionOutput)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


class Logprob(float):
    """A log-probability that is a float and also carries vLLM's fields (.logprob, .rank, .decoded_token)."""

    rank: int | None
    decoded_token: str | None

    def __new__(cls, logprob: float, rank: int | None = None, decoded_token: str | None = None):
        obj = super().__new__(cls, logprob)
        obj.rank, obj.decoded_token = rank, decoded_token
        return obj

    @property
    def logprob(self) -> float:
        return float(self)


def logprob_stats(logprobs: torch.Tensor, targets: torch.Tensor, top_n: list[int | None]) -> list[torch.Tensor]:
    """On the device, per row of logprobs [N, V]: the target's logprob and rank, the top-N values and
    ids, and the targets (what `entries_from_stats` needs, as tensors to bring back in one go)."""
    chosen = logprobs.gather(1, targets[:, None])[:, 0]
    ranks = (logprobs > chosen[:, None]).sum(-1) + 1
    top_v, top_i = logprobs.topk(max([n or 0 for n in top_n] + [1]), dim=-1)
    return [chosen, ranks, top_v, top_i, targets]


def entries_from_stats(stats: list[list], top_n: list[int | None], decode_token: Callable[[int], str] | None = None,
                       ) -> tuple[list[dict[int, Logprob] | None], list[float]]:
    """From logprob_stats read to the host (lists): per row {target: its Logprob, and the row's top-N}
    (None where top_n is None), and the target's logprob."""
    chosen, ranks, top_v, top_i, targets = stats

    def make(value: float, rank: int, token_id: int) -> Logprob:
        return Logprob(value, rank, decode_token(token_id) if decode_token else None)

    entries: list[dict[int, Logprob] | None] = []
    for i, n in enumerate(top_n):
        if n is None:
            entries.append(None)
            continue
        entry = {targets[i]: make(chosen[i], ranks[i], targets[i])}
        for r in range(n):
            entry.setdefault(top_i[i][r], make(top_v[i][r], r + 1, top_i[i][r]))
        entries.append(entry)
    return entries, chosen


def logprob_entries(logprobs: torch.Tensor, targets: torch.Tensor, top_n: list[int | None],
                    decode_token: Callable[[int], str] | None = None,
                    ) -> tuple[list[dict[int, Logprob] | None], list[float]]:
    """entries_from_stats of logprob_stats, with one host read for the whole batch."""
    stats = [t.tolist() for t in logprob_stats(logprobs, targets, top_n)]
    return entries_from_stats(stats, top_n, decode_token)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None  # "stop", "length", "abort" or None while running
    stop_reason: int | str | None = None  # the stop string or token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: dict = field(default_factory=dict)
