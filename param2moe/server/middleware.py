"""ASGI middleware: a request id and the access log (outermost), then the API key and the body-size
limit (before any body is read)."""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid

from .protocol import error_body
from .state import ServerState

log = logging.getLogger("param2moe.server")
access_log = logging.getLogger("param2moe.access")

OPEN_PATHS = {"/health", "/metrics", "/version", "/ping"}


class AccessLog:
    """Gives each request an id (`X-Request-Id` on the reply; the generation endpoints build their
    response ids from it) and logs it when done: every request with --enable-access-log, and always
    those answered 4xx or 5xx (with the error message where there is one)."""

    def __init__(self, app, state: ServerState):
        self.app, self.st = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status, start = [0], time.perf_counter()

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            status[0] = 500
            raise
        finally:
            self._log(scope, status[0], time.perf_counter() - start, request_id)

    def _log(self, scope, status: int, seconds: float, request_id: str) -> None:
        client = scope.get("client")
        line = "%s %s %s %s %.1f ms request_id=%s"
        args = [client[0] if client else "-", scope.get("method"), scope.get("path"), status or "no reply",
                seconds * 1000, request_id]
        error = scope.get("state", {}).get("error_message")
        if error:
            line += ": %s"
            args.append(error[:300])
        if status >= 500 and status != 503:
            access_log.error(line, *args)
        elif status >= 400 and status != 499 or not status:
            access_log.warning(line, *args)
        elif self.st.options.enable_access_log:
            access_log.info(line, *args)


class Guard:
    """The API key (Authorization: Bearer) and the request-body size limit."""

    def __init__(self, app, state: ServerState):
        self.app, self.st = app, state

    @staticmethod
    async def _reply(scope, send, status: int, body: dict, headers=()) -> None:
        scope.setdefault("state", {})["error_message"] = body["error"]["message"]
        data = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                                *headers]})
        await send({"type": "http.response.body", "body": data})

    def _authorized(self, scope, headers: dict) -> bool:
        key = self.st.options.api_key
        if not key or scope["path"] in OPEN_PATHS or scope.get("method") == "OPTIONS":
            return True
        auth = headers.get(b"authorization", b"").decode("latin-1")
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        return hmac.compare_digest(token.encode(), key.encode())

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if not self._authorized(scope, headers):
            return await self._reply(scope, send, 401, error_body(
                "Unauthorized: a valid API key is required (Authorization: Bearer <key>)",
                "authentication_error", code="invalid_api_key"), [(b"www-authenticate", b"Bearer")])
        limit = self.st.options.max_request_bytes
        too_large = error_body(f"the request body is larger than the limit of {limit} bytes (--max-request-bytes)",
                               "invalid_request_error", code="request_too_large")
        length = headers.get(b"content-length")
        if limit and length is not None:
            try:
                if int(length) > limit:
                    return await self._reply(scope, send, 413, too_large)
            except ValueError:
                return await self._reply(scope, send, 400, error_body("bad Content-Length header"))
        if not limit:
            return await self.app(scope, receive, send)
        await self._limited(scope, receive, send, limit, too_large)

    async def _limited(self, scope, receive, send, limit: int, too_large: dict) -> None:
        """Run the app on a body counted as it arrives (no Content-Length, or one that lied)."""
        state = {"received": 0, "over": False, "started": False}

        async def limited_receive():
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > limit:
                    state["over"] = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if state["over"]:
                return  # the app's own reply to a cut body is replaced by the 413 below
            state["started"] = True
            await send(message)

        await self.app(scope, limited_receive, guarded_send)
        if state["over"] and not state["started"]:
            await self._reply(scope, send, 413, too_large)
