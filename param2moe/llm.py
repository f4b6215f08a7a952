"""The offline API, shaped like vLLM's: `LLM(model=...)`, `generate(prompts, SamplingParams(...))`, `chat(...)`."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

from .engine import EngineConfig, LLMEngine, OutputKind, RequestOutput, SamplingParams
from .engine.config import sampling_defaults


class LLM:
    """An engine for offline batches. `model` is a checkpoint folder or a Hugging Face Hub id (default: the
    bundled demo model, param2-demo); every other keyword is an EngineConfig field (the command line's engine options),
    e.g. `LLM(model, dtype="float32", max_num_seqs=64, tensor_parallel_size=2)`.

    `shutdown()` (or leaving a `with LLM(...) as llm:` block) stops the engine's worker processes and frees its
    memory; a dropped LLM does the same when it is garbage-collected."""

    def __init__(self, model: str | None = None, **engine_options):
        known = {f.name for f in dataclasses.fields(EngineConfig)}
        unknown = sorted(set(engine_options) - known)
        if unknown:
            raise TypeError(f"LLM() got unknown engine option(s) {', '.join(unknown)}; "
                            f"known: {', '.join(sorted(known))}")
        self.llm_engine = LLMEngine(EngineConfig(model=model, **engine_options))
        self._ids = itertools.count()

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLM:
        llm = cls.__new__(cls)
        llm.llm_engine = LLMEngine(config)
        llm._ids = itertools.count()
        return llm

    def shutdown(self) -> None:
        """Stop the engine's worker processes and free its model, KV cache and CUDA graphs (idempotent)."""
        self.llm_engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def expert_load(self):
        """Expert load balancing's statistics (needs enable_eplb): an eplb.ExpertLoad with `tokens` [MoE layers,
        experts] routed over the window, `placement` [MoE layers, physical slots], `rank_load` and `imbalance`
        (busiest rank's load over the mean, per layer)."""
        return self.llm_engine.expert_load()

    def get_default_sampling_params(self) -> SamplingParams:
        """The checkpoint's generation_config.json sampling defaults, as vLLM applies them."""
        return SamplingParams(**sampling_defaults(self.llm_engine.generation_config))

    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, lora_request=None) -> list[RequestOutput]:
        """One output per prompt, in order. A prompt is a string, a list of token ids, or a dict with
        "prompt" or "prompt_token_ids". lora_request: a LoRARequest for every prompt, or a list of one per
        prompt (None entries: the base model); needs LLM(enable_lora=True)."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and
                                                 isinstance(prompts[0], int)):
            prompts = [prompts]
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"sampling_params: {len(sampling_params)} given for {len(prompts)} prompts")
        loras = lora_request if isinstance(lora_request, (list, tuple)) else [lora_request] * len(prompts)
        if len(loras) != len(prompts):
            raise ValueError(f"lora_request: {len(loras)} given for {len(prompts)} prompts")
        engine = self.llm_engine
        ids = []
        # generate() returns finished outputs only (as vLLM's does): FINAL_ONLY spares the engine building
        # an output for every request at every step.
        final_only: dict[int, SamplingParams] = {}
        try:
            for prompt, params, lora in zip(prompts, sampling_params, loras):
                rid = str(next(self._ids))
                if params.output_kind != OutputKind.FINAL_ONLY:
                    if id(params) not in final_only:
                        final_only[id(params)] = dataclasses.replace(params, output_kind=OutputKind.FINAL_ONLY)
                    params = final_only[id(params)]
                engine.add_request(rid, prompt, params, lora_request=lora)
                ids.append(rid)
        except Exception:
            for rid in ids:
                engine.abort(rid)
            raise
        return self._run(ids, use_tqdm)

    def chat(self, messages, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, chat_template_kwargs: dict | None = None, tools: list[dict] | None = None,
             add_generation_prompt: bool = True, lora_request=None) -> list[RequestOutput]:
        """Render one conversation (a list of {"role", "content"} messages) or a list of them with the
        checkpoint's chat template, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tok = self.get_tokenizer()
        prompts = []
        for conv in conversations:
            text = tok.apply_chat_template(conv, tools=tools, add_generation_prompt=add_generation_prompt,
                                           **(chat_template_kwargs or {}))
            prompts.append({"prompt": text, "prompt_token_ids": tok.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm, lora_request=lora_request)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        from tqdm import tqdm

        engine = self.llm_engine
        pending = set(ids)
        done: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="Generating", unit="req", disable=not use_tqdm) as bar:
            while pending:
                for out in engine.step():
                    if out.finished and out.request_id in pending:
                        done[out.request_id] = out
                        pending.discard(out.request_id)
                        bar.update(1)
        return [done[i] for i in ids]
