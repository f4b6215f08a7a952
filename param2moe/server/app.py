"""The OpenAI-compatible HTTP server: `param2moe serve`.

`build_app(async_engine, options)` puts the parts together: the routes (routes.py), the errors in
OpenAI's shape (errors.py), the request id, access log, API key and body limit (middleware.py) and
the OpenAPI document (openapi.py); `run_server(args)` loads the engine and serves it with uvicorn until
a signal drains it (lifecycle.py).
"""

from __future__ import annotations

import logging
import time

import uvicorn
from fastapi import FastAPI

from .. import __version__
from ..engine.async_engine import AsyncLLMEngine
from .errors import install_error_handlers
from .lifecycle import DrainingServer, lifespan
from .lora import check_lora_modules
from .middleware import AccessLog, Guard
from .openapi import install_openapi
from .options import ServerOptions
from .routes import router
from .schemas import ChatCompletionChunk, CompletionChunk
from .state import ServerState

log = logging.getLogger("param2moe.server")


def build_app(async_engine: AsyncLLMEngine, options: ServerOptions | None = None) -> FastAPI:
    """The app; its ServerState is app.state.server."""
    st = ServerState(async_engine, options or ServerOptions())
    app = FastAPI(title="param2moe", version=__version__, lifespan=lifespan)
    app.state.server = st
    app.include_router(router)
    install_error_handlers(app)
    install_openapi(app, [ChatCompletionChunk, CompletionChunk], api_key=bool(st.options.api_key))
    app.add_middleware(Guard, state=st)
    app.add_middleware(AccessLog, state=st)  # added last: the outermost, so it sees every reply
    return app


def run_server(args) -> int:
    from ..engine import EngineConfig, LLMEngine

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = ServerOptions.from_args(args)
    config = EngineConfig.from_cli_args(args)
    adapters = check_lora_modules(options.lora_modules, config.enable_lora)  # before the model loads
    t0 = time.perf_counter()
    engine = LLMEngine(config)
    async_engine = AsyncLLMEngine(engine)
    app = build_app(async_engine, options)
    st = app.state.server
    for name, path in adapters:
        st.adapters.register(name, path)  # read and checked against the model before serving
    log.info("loaded %s in %.1f s (max_model_len %d, %d KV blocks of %d tokens); serving `%s` on http://%s:%d",
             st.model_root or st.model_name, time.perf_counter() - t0, st.max_model_len,
             len(engine.block_manager.blocks), engine.block_manager.block_size, st.model_name, options.host,
             options.port)
    # Keep-alive: uvicorn's 5 s default closed idle connections just as busy clients reused them
    # (a ReadError before any response, ~2 in 1000 requests at 256 concurrent streams); 60 s did not.
    server_config = uvicorn.Config(app, host=options.host, port=options.port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5, lifespan="on", timeout_keep_alive=60)
    DrainingServer(server_config, st, options.drain_seconds).run()
    if hasattr(engine, "shutdown"):
        engine.shutdown()
    log.info("stopped")
    return 0
