"""The engine's side of structured outputs: a grammar matcher per constrained sequence, the step's
token bitmask filled on the CPU, and the matchers advanced on the tokens the engine accepts.

The engine calls `bitmask` after it has launched the step's forward pass and read the tokens of the
step before (LLMEngine.step), so the CPU fills the masks while the GPU computes; the sampler applies
them before any sampling option (bitmask.py). Each sequence of a request (n > 1) has its own matcher.
A matcher ends with a stop token; the sequence finishes there, and EOS is allowed only where the
grammar accepts the end.
"""

from __future__ import annotations

import logging
import threading

import torch

from .params import StructuredOutputError, StructuredOutputsParams

log = logging.getLogger("param2moe")


class StructuredOutputs:
    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: list[int], compile_timeout: float):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.eos_token_ids, self.compile_timeout = list(eos_token_ids), compile_timeout
        self._compiler = None
        self._batch = None  # xgrammar's BatchGrammarMatcher: fills the rows on a few threads
        self._lock = threading.Lock()  # the server compiles on several threads

    @property
    def compiler(self):
        """Made on first use (imports xgrammar, reads the vocabulary)."""
        with self._lock:
            if self._compiler is None:
                if self.tokenizer is None:
                    raise StructuredOutputError("structured_outputs: needs a tokenizer, and this model has none")
                from .compiler import GrammarCompiler

                compiler = GrammarCompiler(self.tokenizer, self.vocab_size, self.eos_token_ids, self.compile_timeout)
                self._batch = compiler.xgr.BatchGrammarMatcher()
                self._compiler = compiler
            return self._compiler

    def compile(self, params: StructuredOutputsParams):
        return self.compiler.compile(params)

    def start(self, seq, compiled) -> None:
        """Give the sequence its matcher. The grammar ends on the request's stop tokens: EOS (unless
        ignore_eos) and its stop_token_ids."""
        p = seq.params
        stops = ([] if p.ignore_eos else self.eos_token_ids) + [t for t in p.stop_token_ids
                                                                if t not in self.eos_token_ids]
        seq.grammar = self.compiler.matcher(compiled, stops or self.eos_token_ids)

    def bitmask(self, seqs: list, device: torch.device) -> torch.Tensor | None:
        """[len(seqs), ceil(V / 32)] int32 on the device (bit t % 32 of word t // 32: token t allowed), or
        None when no sequence is constrained. Rows of free (or already finished) sequences allow all."""
        rows = [i for i, s in enumerate(seqs) if s.grammar is not None and not s.is_finished]
        if not rows:
            return None
        shape = (len(seqs), -(-self.vocab_size // 32))
        # Pinned on CUDA: the copy does not wait for the GPU (torch's host allocator keeps the block
        # until the copy has run).
        host = torch.empty(shape, dtype=torch.int32, pin_memory=device.type == "cuda").fill_(-1)
        self._batch.batch_fill_next_token_bitmask([seqs[i].grammar for i in rows], host, rows)
        return host.to(device, non_blocking=True) if device.type == "cuda" else host.to(device)

    @staticmethod
    def advance(seq, token: int) -> str | None:
        """Move the sequence's matcher past its new token: "stop" when the grammar has ended, "abort"
        when it refuses the token (a bug: the mask allowed it), else None."""
        if not seq.grammar.accept_token(token):
            log.error("structured output: the grammar refused token %d of request %s; aborting it", token,
                      seq.request.request_id)
            return "abort"
        return "stop" if seq.grammar.is_terminated() else None
