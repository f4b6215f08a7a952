"""Every error the server answers, in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.async_engine import EngineDeadError
from .protocol import RequestError, error_body
from .streaming import ClientGone

log = logging.getLogger("param2moe.server")

_TYPE_NAMES = {"str", "int", "float", "bool", "dict", "list", "none"}


def error_response(request: Request | None, status: int, message: str, type: str = "invalid_request_error",
                   param: str | None = None, code=None, headers: dict | None = None) -> JSONResponse:
    if request is not None:  # for the access log (middleware.py)
        request.state.error_message = message
    return JSONResponse(error_body(message, type, param, code), status_code=status, headers=headers)


def _field_path(loc) -> list[str]:
    """The request field a pydantic error location names, without "body" and without the tags pydantic
    adds for each branch of a union (`str`, `list[int]`, a model's class name)."""
    out = []
    for x in loc:
        if isinstance(x, int):
            out.append(str(x))
        elif x != "body" and x.isidentifier() and x not in _TYPE_NAMES and not x[:1].isupper():
            out.append(x)
    return out


def validation_message(errors) -> tuple[str, str | None]:
    """(message, param) of a body that does not fit the request model."""
    parts, param = [], None
    for e in errors:
        cause = (e.get("ctx") or {}).get("error")
        if isinstance(cause, RequestError):
            return cause.message, cause.param
        if e.get("type") == "json_invalid":
            ctx = e.get("ctx") or {}
            return f"the body is not valid JSON: {ctx.get('error', e.get('msg'))}", None
        path = _field_path(e.get("loc", ()))
        param = param or (path[0] if path else None)
        where = ".".join(path)
        part = f"{where}: {e.get('msg')}" if where else str(e.get("msg"))
        if part not in parts:
            parts.append(part)
    return "; ".join(parts[:5]) or "invalid request body", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def _request_error(request, e: RequestError):
        headers = {"Retry-After": "1"} if e.status == 503 else None
        return error_response(request, e.status, e.message, e.type, e.param, e.code, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        message, param = validation_message(e.errors())
        return error_response(request, 400, message, param=param, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        if e.status_code == 404:  # no such route (OpenAI's words)
            return error_response(request, 404, f"Invalid URL ({request.method} {request.url.path})",
                                  "invalid_request_error")
        return error_response(request, e.status_code, str(e.detail), headers=getattr(e, "headers", None))

    @app.exception_handler(EngineDeadError)
    async def _engine_dead(request, e):
        return error_response(request, 503, str(e), "service_unavailable", code="shutting_down",
                              headers={"Retry-After": "1"})

    @app.exception_handler(ClientGone)
    async def _client_gone(request, e):
        return Response(status_code=499)

    @app.exception_handler(ValueError)
    async def _value_error(request, e: ValueError):  # EngineError and other invalid values
        msg = str(e)
        param = msg.split(":", 1)[0].split("=", 1)[0].strip() if ":" in msg else None
        return error_response(request, 400, msg, param=param if param and param.isidentifier() else None,
                              code="invalid_value")

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        log.exception("unhandled error on %s (request %s)", request.url.path,
                      getattr(request.state, "request_id", "-"), exc_info=e)
        return error_response(request, 500, f"internal error: {type(e).__name__}", "internal_server_error",
                              code="internal_error")
