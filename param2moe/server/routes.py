"""The HTTP endpoints, as module-level handlers on one router; each reads the ServerState from
`request.app.state.server`. Their OpenAPI descriptions (responses, errors) come from openapi.py."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse, Response

from .. import __version__
from . import schemas
from .chat_input import chat_input
from .openapi import EMPTY, document, plain_text, streamed
from .prepare import encode_chat, prepare_chat, prepare_completion
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    LoadLoRAAdapterRequest,
    RequestError,
    TokenizeRequest,
    UnloadLoRAAdapterRequest,
)
from .serving import chat_full, chat_stream, completion_full, completion_stream
from .state import ServerState
from .streaming import respond

router = APIRouter()


def server(request: Request) -> ServerState:
    return request.app.state.server


State = Annotated[ServerState, Depends(server)]


# ------------------------------------------------------------------------------------ plain endpoints
@router.get("/health", response_class=Response, responses={200: EMPTY, 503: EMPTY},
            summary="200 while serving, 503 once shutting down (empty bodies)")
async def health(st: State):
    return Response(status_code=503 if st.draining else 200)


@router.get("/ping", response_class=Response, responses={200: EMPTY}, summary="200 (an empty body)")
async def ping():
    return Response(status_code=200)


@router.get("/version", **document(schemas.VersionResponse))
async def version():
    return {"version": __version__}


@router.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics (text format 0.0.4)")
async def metrics(st: State):
    return PlainTextResponse(st.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/v1/models", **document(schemas.ModelList, 401))
async def models(st: State):
    return {"object": "list", "data": st.model_cards()}


@router.get("/v1/models/{model_id:path}", **document(schemas.ModelCard, 401, 404))
async def model(model_id: str, st: State):
    lora = st.resolve_model(model_id)
    cards = st.model_cards()
    return next(c for c in cards if c["id"] == lora.lora_name) if lora else cards[0]


# ------------------------------------------------------------------------------------ LoRA adapters (vLLM's)
@router.post("/v1/load_lora_adapter", **plain_text("a confirmation", 400, 401, 413),
             summary="serve a PEFT LoRA adapter under lora_name, its model id from then on (needs --enable-lora)")
async def load_lora_adapter(req: LoadLoRAAdapterRequest, st: State):
    await st.adapters.load(req.lora_name, req.lora_path)
    return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter",
             **plain_text("a confirmation", 400, 401, 404, 413),
             summary="stop serving an adapter (refused while requests of it are unfinished)")
async def unload_lora_adapter(req: UnloadLoRAAdapterRequest, st: State):
    await st.adapters.unload(req.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")


@router.post("/tokenize", **document(schemas.TokenizeResponse, 400, 401, 404, 413))
async def tokenize(req: TokenizeRequest, st: State):
    st.check_model(req.model)
    st.need_tokenizer()
    if (req.prompt is None) == (req.messages is None):
        raise RequestError("give either prompt or messages", "prompt")
    if req.messages is not None:
        chat = chat_input(req.messages, req.tools, None, add_generation_prompt=req.add_generation_prompt,
                          continue_final_message=req.continue_final_message, template_kwargs=req.chat_template_kwargs)
        _, ids = await encode_chat(st, chat, bool(req.add_special_tokens))
    else:
        add = True if req.add_special_tokens is None else req.add_special_tokens
        ids = await st.off_loop(st.tokenizer.encode, req.prompt, add, size=len(req.prompt))
    body = {"count": len(ids), "max_model_len": st.max_model_len, "tokens": ids}
    if req.return_token_strs:
        body["token_strs"] = [st.tokenizer.id_to_token(i) for i in ids]
    return body


@router.post("/detokenize", **document(schemas.DetokenizeResponse, 400, 401, 404, 413))
async def detokenize(req: DetokenizeRequest, st: State):
    st.check_model(req.model)
    st.need_tokenizer()
    bad = next((t for t in req.tokens if not 0 <= t < st.vocab_size), None)
    if bad is not None:
        raise RequestError(f"tokens: token id {bad} is outside the vocabulary [0, {st.vocab_size})", "tokens")
    text = await st.off_loop(st.tokenizer.decode, req.tokens, False, size=len(req.tokens))
    return {"prompt": text}


# ------------------------------------------------------------------------------------------ generation
@router.post("/v1/chat/completions", **streamed(schemas.ChatCompletionResponse, schemas.ChatCompletionChunk))
async def chat_completions(req: ChatCompletionRequest, request: Request, st: State):
    ctx, jobs = await prepare_chat(st, req, f"chatcmpl-{request.state.request_id}")
    return await respond(request, st, jobs, stream=bool(req.stream),
                         full=lambda streams, trackers: chat_full(streams[0], ctx, trackers[0]),
                         streamed=lambda streams, trackers: chat_stream(streams[0], ctx, trackers[0]))


@router.post("/v1/completions", **streamed(schemas.CompletionResponse, schemas.CompletionChunk))
async def completions(req: CompletionRequest, request: Request, st: State):
    ctx, jobs = await prepare_completion(st, req, f"cmpl-{request.state.request_id}")
    return await respond(request, st, jobs, stream=bool(req.stream),
                         full=lambda streams, trackers: completion_full(streams, ctx, trackers),
                         streamed=lambda streams, trackers: completion_stream(streams, ctx, trackers))
