"""The OpenAPI document (/openapi.json) as the server behaves: the response bodies of each endpoint
(schemas.py), the errors it can answer (400, 401, 404, 413, 503; never FastAPI's 422, since a body
that does not validate is a 400), SSE for `stream: true`, and bearer auth where --api-key is set."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from .middleware import OPEN_PATHS
from .schemas import ErrorResponse

EMPTY = {"description": "an empty body", "content": {}}

_ERRORS = {
    400: "the request is invalid (the message names the field)",
    401: "no valid API key (only with --api-key)",
    404: "no such model",
    413: "the body is larger than --max-request-bytes",
    503: "the queue is full or the server is shutting down (Retry-After says when to try again)",
}
_GENERATION_ERRORS = (400, 401, 404, 413, 503)


def document(model, *errors: int) -> dict:
    """Route keywords that document a JSON reply of this model and these error statuses."""
    responses = {code: {"model": ErrorResponse, "description": _ERRORS[code]} for code in errors}
    return {"response_model": None, "responses": {200: {"model": model}, **responses}}


def plain_text(description: str, *errors: int) -> dict:
    """Route keywords that document a text/plain reply and these error statuses."""
    out = document(None, *errors)
    out["responses"][200] = {"description": description, "content": {"text/plain": {"schema": {"type": "string"}}}}
    return out


def streamed(model, chunk_model) -> dict:
    """As document(), for an endpoint that streams SSE events of chunk_model when `stream` is true."""
    out = document(model, *_GENERATION_ERRORS)
    out["responses"][200]["description"] = (
        f"a {model.__name__}; with `stream: true`, server-sent events instead: `data: <{chunk_model.__name__}>` "
        "per chunk (an ErrorResponse if the request fails mid-stream), then `data: [DONE]`")
    out["responses"][200]["content"] = {"text/event-stream": {"schema": {"type": "string"}}}
    out["openapi_extra"] = {"x-stream-event": {"$ref": f"#/components/schemas/{chunk_model.__name__}"}}
    return out


def install_openapi(app: FastAPI, chunk_models, api_key: bool) -> None:
    def build() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, routes=app.routes,
                          description="An OpenAI-compatible server for Param-2 MoE models (param2moe).")
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        for m in chunk_models:
            chunk = m.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(chunk.pop("$defs", {}))
            schemas[m.__name__] = chunk
        for path, ops in doc.get("paths", {}).items():
            for op in ops.values():
                op.get("responses", {}).pop("422", None)
                if api_key and path not in OPEN_PATHS:
                    op["security"] = [{"bearer": []}]
        if api_key:
            doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        app.openapi_schema = doc
        return doc

    app.openapi = build
