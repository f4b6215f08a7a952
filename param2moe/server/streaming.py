"""The tail every generation request shares: admit it, start its engine requests, and answer with SSE
or one JSON body; a client that goes away (mid-stream or while waiting for a whole body) aborts its
engine requests, which frees their KV blocks, and the admitted room is given back in every case."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from .prepare import EngineJob
from .state import ServerState


class ClientGone(Exception):
    pass


class SSEResponse(StreamingResponse):
    """Server-sent events that notice a client going away at once (not only at the next write), then
    close the body generator so that the engine request is aborted and its KV blocks freed."""

    def __init__(self, content, on_close=None):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as tg:
                async def stream() -> None:
                    with contextlib.suppress(OSError):
                        await self.stream_response(send)
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                with contextlib.suppress(Exception):
                    await self.body_iterator.aclose()
                if self.on_close is not None:
                    self.on_close()


async def _until_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_until_disconnect(request: Request, coro):
    """Await coro, but cancel it (aborting its engine request) if the client disconnects first."""
    task = asyncio.ensure_future(coro)
    watch = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            raise ClientGone()
    return task.result()


async def respond(request: Request, st: ServerState, jobs: list[EngineJob], *, stream: bool,
                  full: Callable, streamed: Callable):
    """Run the jobs and answer: streamed(streams, trackers) gives the SSE chunks, full(streams, trackers)
    the whole body."""
    total = sum(job.params.n for job in jobs)
    st.admit(total, "n" if len(jobs) == 1 else "prompt")
    trackers = [st.metrics.tracker(len(job.token_ids)) for job in jobs]

    def close() -> None:
        st.release(total)
        for t in trackers:
            t.finish("abort")  # no-op for those that finished

    try:
        streams = [st.async_engine.generate(job.engine_input, job.params, job.request_id, job.lora_request)
                   for job in jobs]
        if stream:
            return SSEResponse(streamed(streams, trackers), on_close=close)
    except BaseException:
        close()
        raise
    try:
        return JSONResponse(await run_until_disconnect(request, full(streams, trackers)))
    except ClientGone:
        raise
    except Exception:
        for t in trackers:
            t.finish("error")
        raise
    finally:
        close()
