"""An asyncio front end for the server: submit a request, iterate over its output deltas, abort it.

Every call into the engine runs on one worker thread, so requests are added and aborted between
steps and the event loop stays free while the model computes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from .llm_engine import LLMEngine
from .outputs import RequestOutput
from .sampling_params import OutputKind, SamplingParams

log = logging.getLogger("param2moe")


class EngineDeadError(RuntimeError):
    pass


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._queues: dict[str, asyncio.Queue] = {}
        self._has_work: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._stopping = False

    async def _call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._has_work = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while not self._stopping:
            if not self.engine.has_unfinished_requests():
                self._has_work.clear()
                await self._has_work.wait()
                continue
            try:
                outputs = await self._call(self.engine.step)
            except Exception as e:  # a failed step fails the requests in flight, not the server
                log.exception("engine step failed")
                for rid, q in list(self._queues.items()):
                    q.put_nowait(e)
                    await self._call(self.engine.abort, rid)
                continue
            for out in outputs:
                q = self._queues.get(out.request_id)
                if q is not None:
                    q.put_nowait(out)

    async def generate(self, prompt, params: SamplingParams, request_id: str,
                       lora_request=None) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs as deltas (new text and tokens since the last one) until it
        finishes. Leaving the iteration early (a client that went away) aborts the request. lora_request: the
        adapter it runs with (a LoRARequest), or None."""
        if self._stopping:
            raise EngineDeadError("the server is shutting down")
        self._ensure_loop()
        params = dataclasses.replace(params, output_kind=OutputKind.DELTA)
        q: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = q
        finished = False
        try:
            await self._call(functools.partial(self.engine.add_request, lora_request=lora_request), request_id,
                             prompt, params)
            self._has_work.set()
            while not finished:
                out = await q.get()
                if isinstance(out, Exception):
                    raise out
                finished = out.finished
                yield out
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                # Not awaited: a cancelled task (a client that went away) may not await again here,
                # and the abort must still run. The one worker thread keeps it in order.
                self.abort_nowait(request_id)

    async def add_lora(self, lora_request) -> None:
        """Register an adapter (read and checked on the engine's thread, between steps)."""
        await self._call(self.engine.add_lora, lora_request)

    async def remove_lora(self, lora_id: int) -> bool:
        return await self._call(self.engine.remove_lora, lora_id)

    async def abort(self, request_id: str) -> None:
        await self._call(self.engine.abort, request_id)

    def abort_nowait(self, request_id: str) -> None:
        """Queue an abort on the worker thread without waiting for it (safe from a cancelled task)."""
        try:
            self._executor.submit(self.engine.abort, request_id)
        except RuntimeError:  # the executor is shut down: the engine is stopping anyway
            pass

    @property
    def num_running(self) -> int:
        return len(self.engine.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.engine.scheduler.waiting)

    async def shutdown(self, drain_seconds: float = 0.0) -> None:
        """Let in-flight requests finish for up to drain_seconds, then abort the rest and stop."""
        deadline = asyncio.get_running_loop().time() + drain_seconds
        while self.engine.has_unfinished_requests() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        self._stopping = True
        for rid, q in list(self._queues.items()):
            q.put_nowait(EngineDeadError("the server is shutting down"))
            await self.abort(rid)
        if self._has_work is not None:
            self._has_work.set()
        self._executor.shutdown(wait=False)
