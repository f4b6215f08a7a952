"""Request bodies of the OpenAI-compatible API (and vLLM's extras), as pydantic models.

Unknown fields are accepted and ignored, as OpenAI clients send some we do not use. Every field the
engine samples with is listed; `to_sampling_fields` maps them to SamplingParams arguments.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_LOGPROBS = 20
MAX_STOP, MAX_STOP_IDS = 256, 1024  # every new token is checked against each of them


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


class StreamOptions(OpenAIModel):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class SamplingFields(OpenAIModel):
    """Fields common to completions and chat completions."""

    model: str | None = None
    n: int | None = 1
    best_of: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    prompt_logprobs: int | None = None
    response_format: dict[str, Any] | None = None  # text, json_object, json_schema (server/structured.py)
    structured_outputs: dict[str, Any] | None = None  # vLLM's: json, regex, choice, grammar, ...


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    logprobs: int | None = None
    suffix: str | None = None
    add_special_tokens: bool = True


class ChatCompletionRequest(SamplingFields):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = True
    # vLLM's extras
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False


class TokenizeRequest(OpenAIModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: list[int]


class RequestError(ValueError):
    """A bad request: status, message, and the field it is about."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type, code


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def parse_logit_bias(bias: dict[str, float] | None, vocab_size: int) -> dict[int, float] | None:
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise RequestError(f"logit_bias: key {key!r} is not a token id", "logit_bias") from None
        if not 0 <= token < vocab_size:
            raise RequestError(f"logit_bias: token id {token} is outside the vocabulary [0, {vocab_size})",
                               "logit_bias")
        if not -100.0 <= value <= 100.0:
            raise RequestError(f"logit_bias: bias {value} for token {token} is outside [-100, 100]", "logit_bias")
        out[token] = float(value)
    return out


def to_sampling_fields(req: SamplingFields, defaults: dict[str, Any], vocab_size: int, *,
                       logprobs: int | None, max_tokens: int | None) -> dict[str, Any]:
    """SamplingParams arguments for a request: its fields, else the model's generation config."""
    if req.best_of is not None and req.best_of != (req.n or 1):
        raise RequestError("best_of: only best_of == n is supported", "best_of")
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise RequestError(f"logprobs: {logprobs} must be in [0, {MAX_LOGPROBS}]", "logprobs")
    if req.prompt_logprobs is not None and not 0 <= req.prompt_logprobs <= MAX_LOGPROBS:
        raise RequestError(f"prompt_logprobs: {req.prompt_logprobs} must be in [0, {MAX_LOGPROBS}]",
                           "prompt_logprobs")
    stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    if len(stops) > MAX_STOP:
        raise RequestError(f"stop: at most {MAX_STOP} stop strings", "stop")
    if req.stop_token_ids and len(req.stop_token_ids) > MAX_STOP_IDS:
        raise RequestError(f"stop_token_ids: at most {MAX_STOP_IDS} ids", "stop_token_ids")
    if req.stop_token_ids and any(not 0 <= t < vocab_size for t in req.stop_token_ids):
        raise RequestError(f"stop_token_ids: ids must be in [0, {vocab_size})", "stop_token_ids")

    def pick(name: str, fallback):
        value = getattr(req, name)
        if value is not None:
            return value
        return defaults.get(name, fallback)

    return dict(
        n=req.n if req.n is not None else 1,
        temperature=pick("temperature", 1.0),
        top_p=pick("top_p", 1.0),
        top_k=pick("top_k", -1),
        min_p=pick("min_p", 0.0),
        repetition_penalty=pick("repetition_penalty", 1.0),
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        logit_bias=parse_logit_bias(req.logit_bias, vocab_size),
        seed=req.seed,
        max_tokens=max_tokens,
        min_tokens=req.min_tokens,
        stop=req.stop,
        stop_token_ids=list(req.stop_token_ids or []),
        ignore_eos=req.ignore_eos,
        include_stop_str_in_output=req.include_stop_str_in_output,
        logprobs=logprobs,
        prompt_logprobs=req.prompt_logprobs,
        skip_special_tokens=req.skip_special_tokens,
    )
