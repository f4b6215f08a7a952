"""Starting and stopping: the app's lifespan, and uvicorn's Server with our signal handling. On SIGTERM
(or Ctrl-C) the server stops taking requests, lets those in flight finish for up to --drain-seconds,
aborts the rest and exits with status 0; a second signal aborts at once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading

import uvicorn

from .state import ServerState

log = logging.getLogger("param2moe.server")


@contextlib.asynccontextmanager
async def lifespan(app):
    yield
    st: ServerState = app.state.server
    await st.async_engine.shutdown(0.0)
    st.close()


class DrainingServer(uvicorn.Server):
    """uvicorn's Server with our own signal handling: the first SIGTERM/SIGINT drains, a second one
    aborts what is left at once; either way the process exits with status 0 (uvicorn's own handler
    would re-raise the signal after shutting down)."""

    def __init__(self, config, st: ServerState, drain_seconds: float):
        super().__init__(config)
        self.st, self.drain_seconds = st, drain_seconds
        self._drain_task: asyncio.Task | None = None

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            yield
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    def _on_signal(self, sig) -> None:
        name = signal.Signals(sig).name
        if self._drain_task is None:
            log.info("%s: no new requests; draining those in flight (up to %.0f s), then stopping", name,
                     self.drain_seconds)
            self._drain_task = asyncio.ensure_future(self._drain(self.drain_seconds))
        else:
            log.info("%s again: aborting the requests in flight", name)
            self._drain_task.cancel()
            self._drain_task = asyncio.ensure_future(self._drain(0.0))

    async def _drain(self, seconds: float) -> None:
        self.st.draining = True
        await self.st.async_engine.shutdown(seconds)
        await asyncio.sleep(0.2)  # let the last responses go out
        self.should_exit = True
