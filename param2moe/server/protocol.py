"""Request bodies of the OpenAI-compatible API (and vLLM's extras), as pydantic models.

Unknown fields are accepted and ignored, as OpenAI clients send some we do not use. Types are strict:
`"stream": "yes"`, `"n": "2"` or a token id `false` are refused rather than coerced (a JSON integer is
still a number). Text anywhere in a body must be valid Unicode: a lone surrogate (`"\\ud800"`) is
refused naming its field. Every field the engine samples with is listed; `to_sampling_fields` maps
them to SamplingParams arguments.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

MAX_LOGPROBS = 20
MAX_STOP, MAX_STOP_IDS = 256, 1024  # every new token is checked against each of them


class RequestError(ValueError):
    """A bad request: status, message, and the field it is about."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type, code


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _not_unicode(s: str) -> bool:
    if s.isascii():
        return False
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _lone_surrogate(value, path: str) -> str | None:
    """The path of the first string (or key) in value that holds a lone surrogate, or None."""
    if isinstance(value, str):
        return (path or "body") if _not_unicode(value) else None
    if isinstance(value, dict):
        for k, v in value.items():
            where = f"{path}.{k}" if path else str(k)
            if isinstance(k, str) and _not_unicode(k):
                return path or "body"
            found = _lone_surrogate(v, where)
            if found:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = _lone_surrogate(v, f"{path}.{i}")
            if found:
                return found
    return None


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, strict=True)


class RequestBody(OpenAIModel):
    """A whole request body: its text is checked for lone surrogates (the tokenizer cannot take them)."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data):
        where = _lone_surrogate(data, "")
        if where:
            raise RequestError(f"{where}: a lone surrogate (such as \\ud800) is not valid Unicode text",
                               None if where == "body" else where.split(".", 1)[0])
        return data


# ------------------------------------------------------------------------------------ chat messages
class ContentPart(OpenAIModel):
    """A part of a message's content; only text parts are supported."""

    type: str = Field(description="`text` (other part types are refused)")
    text: str | None = None


class FunctionCall(OpenAIModel):
    name: str
    arguments: str | dict[str, Any] = Field("{}", description="a JSON string (an object is taken too)")


class ToolCallIn(OpenAIModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(OpenAIModel):
    role: Literal["assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    reasoning_content: str | None = None


class Message(OpenAIModel):
    """A message of any role but the assistant's: system, developer (read as system), user, tool, or
    another role the chat template knows."""

    role: str = Field(min_length=1)
    content: str | list[ContentPart]
    name: str | None = None
    tool_call_id: str | None = Field(None, description="a tool message: the call it answers")


def _message_kind(m) -> str:
    role = m.get("role") if isinstance(m, dict) else getattr(m, "role", None)
    return "Assistant" if role == "assistant" else "Message"


ChatMessage = Annotated[Annotated[AssistantMessage, Tag("Assistant")] | Annotated[Message, Tag("Message")],
                        Discriminator(_message_kind)]


class FunctionDefinition(OpenAIModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON schema of the arguments")
    strict: bool | None = None


class Tool(OpenAIModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class FunctionName(OpenAIModel):
    name: str


class NamedToolChoice(OpenAIModel):
    type: Literal["function"]
    function: FunctionName


class JsonSchemaFormat(OpenAIModel):
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(OpenAIModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


# ------------------------------------------------------------------------------------------ requests
class StreamOptions(OpenAIModel):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class SamplingFields(RequestBody):
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
    stream_options: StreamOptions | None = Field(None, description="only with stream=true")
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
    prompt_logprobs: int | None = Field(None, description="not with stream=true")
    response_format: ResponseFormat | None = Field(
        None, description="text, json_object or json_schema: the reply constrained to it (server/structured.py)")
    structured_outputs: dict[str, Any] | None = Field(
        None, description="vLLM's: one of json, regex, choice, grammar, json_object, structural_tag")


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="text, several texts, token ids, or several lists of token ids")
    echo: bool | None = False
    logprobs: int | None = None
    suffix: str | None = Field(None, description="not supported (refused when given)")
    add_special_tokens: bool = True


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = True
    # vLLM's extras
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False


class TokenizeRequest(RequestBody):
    """Either `prompt` or `messages`."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: list[Tool] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(RequestBody):
    model: str | None = None
    tokens: list[int]


class LoadLoRAAdapterRequest(RequestBody):
    """vLLM's /v1/load_lora_adapter: the adapter's name (its model id from then on) and its PEFT folder."""

    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(RequestBody):
    lora_name: str
    lora_int_id: int | None = Field(None, description="accepted (vLLM sends it), not needed: names are unique")


# ---------------------------------------------------------------------------------- sampling fields
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


def check_stream_fields(req: SamplingFields) -> None:
    """Fields that only mean something with (or without) streaming, refused where they would be ignored."""
    if req.stream_options is not None and not req.stream:
        raise RequestError("stream_options: only with stream=true", "stream_options")
    if req.prompt_logprobs is not None and req.stream:
        raise RequestError("prompt_logprobs: not available with stream=true", "prompt_logprobs")


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
