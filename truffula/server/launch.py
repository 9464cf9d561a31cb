"""``truffula serve``: load the model, print the URL when ready, shut down gracefully."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from truffula import __version__
from truffula.config import EngineConfig
from truffula.engine.async_engine import AsyncEngine
from truffula.server.metrics import Metrics
from truffula.server.state import ServerSettings, ServerState

log = logging.getLogger("truffula.server")


def model_id_of(config: EngineConfig, core) -> str:  # type: ignore[no-untyped-def]
    from truffula.model_store.default_model import DEFAULT_MODEL_ALIASES, DEFAULT_MODEL_NAME

    name = config.model.model
    return f"HuggingFaceTB/{DEFAULT_MODEL_NAME}" if name in DEFAULT_MODEL_ALIASES else name


async def build_state(config: EngineConfig, args: argparse.Namespace) -> ServerState:
    engine = await AsyncEngine.create(config)
    settings = ServerSettings(
        model_id=model_id_of(config, engine.core),
        api_key=getattr(args, "api_key", None),
        default_adapter_source=getattr(args, "adapter_source", None),
        version=__version__,
    )
    metrics = Metrics()
    metrics.bind(engine.core)
    state = ServerState(engine, settings, metrics)
    for adapter_id in getattr(args, "preload_adapter", []) or []:
        await state.preload_adapter(adapter_id)
    return state


def serve(args: argparse.Namespace, config: EngineConfig) -> int:
    import uvicorn

    from truffula.server.app import create_app

    logging.getLogger("truffula").setLevel(logging.INFO)

    async def main() -> int:
        state = await build_state(config, args)
        app = create_app(state)
        uv = uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            timeout_graceful_shutdown=int(max(1, args.drain_timeout)),
            lifespan="off",
        )
        server = uvicorn.Server(uv)
        state.engine.start()

        async def announce() -> None:
            while not server.started:
                await asyncio.sleep(0.05)
            host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
            print(
                f"truffula {__version__} serving {state.settings.model_id} at http://{host}:{args.port}",
                flush=True,
            )

        task = asyncio.create_task(announce())
        # uvicorn drains connections on SIGINT/SIGTERM, then re-raises the signal; after a
        # clean drain that re-raise should not kill the process with a signal status.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: None)
        try:
            await server.serve()
        finally:
            task.cancel()
            await state.engine.shutdown(drain_timeout=0)
        return 0

    try:
        return asyncio.run(main())
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        sys.stdout.flush()
