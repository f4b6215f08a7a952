"""A request and its sequences (one per sample when n > 1): tokens, cache blocks, output state."""

from __future__ import annotations

import time
from enum import Enum, auto

from .detokenizer import IncrementalDetokenizer
from .outputs import Logprob
from .sampling_params import SamplingParams


class SeqStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    def __init__(self, seq_id: int, request: Request, index: int, detokenizer: IncrementalDetokenizer | None):
        self.seq_id, self.request, self.index = seq_id, request, index
        self.params = request.params
        self.token_ids: list[int] = list(request.prompt_token_ids)  # the tokens the host has read
        # Sampled on the device, not read yet: the engine launches the next step before reading the tokens of
        # the one before (LLMEngine.step); that step takes them from the device. 0 or 1; 0 once finished.
        self.num_pending_tokens = 0
        self.num_prompt_tokens = len(self.token_ids)
        self.num_computed_tokens = 0  # tokens whose keys and values are in the cache
        self.num_cached_tokens = 0  # of those, found in the prefix cache when first scheduled
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # prefix-cache keys of the full blocks at the table's head
        self.lora_slot = -1  # the adapter slot it holds while running (LoRAManager), -1: none
        self.status = SeqStatus.WAITING
        self.seed = None if self.params.seed is None else self.params.seed + index
        self.generator = None  # a torch.Generator, made by the sampler on the model's device
        self.grammar = None  # the grammar matcher of a constrained output (structured/manager.py)
        self.logprobs: list[dict[int, Logprob]] | None = [] if self.params.logprobs is not None else None
        self.prompt_logprobs: list[dict[int, Logprob] | None] | None = (
            [None] if self.params.prompt_logprobs is not None else None)
        self.cumulative_logprob = 0.0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.detokenizer = detokenizer
        self.text = ""
        self.num_text_sent = 0  # for DELTA outputs
        self.num_tokens_sent = 0

    @property
    def num_tokens(self) -> int:
        """Tokens the sequence holds, a pending one included."""
        return len(self.token_ids) + self.num_pending_tokens

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        """The generated tokens the host has read."""
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status == SeqStatus.FINISHED

    @property
    def cache_salt(self):
        """What its first cache block's hash starts from: its adapter's salt (None: the base model), so that
        prefix-cache blocks are never shared across adapters."""
        lora = self.request.lora
        return None if lora is None else lora.cache_salt

    @property
    def needs_prompt_logprobs(self) -> bool:
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens


class Request:
    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                 lora=None):
        self.request_id, self.prompt = request_id, prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.lora = lora  # a lora.LoRAAdapter, or None: the base model
        self.seqs: list[Sequence] = []
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.prompt_logprobs_sent = False

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)
