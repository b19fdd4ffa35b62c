"""Start the server: `serve()` for `mnemosyne serve` (blocks, Ctrl-C or SIGTERM drains),
`BackgroundServer` for tests and benchmarks (uvicorn on a thread of this process).

`serve()` binds its port before loading the model (a port in use fails at once) and logs
the start-up summary (engine/summary.py) once the engine is ready.

Shutdown order: uvicorn stops accepting, waits up to `shutdown_timeout_s` for open
requests to finish (drain), cancels the rest (their handles abort them), then the
app's lifespan stops the engine thread, which aborts anything left and stops the
worker processes.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
import time
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI

from mnemosyne.engine.args import EngineArgs
from mnemosyne.engine.llm_engine import LLMEngine, load_tokenizer
from mnemosyne.engine.summary import engine_summary, format_summary
from mnemosyne.errors import ConfigError
from mnemosyne.models.default_model import DEFAULT_MODEL_NAME
from mnemosyne.server.api_server import build_app
from mnemosyne.server.async_engine import AsyncEngine
from mnemosyne.server.metrics import ServerMetrics
from mnemosyne.server.serving import ServingContext

logger = logging.getLogger("mnemosyne.server")


@dataclass(frozen=True)
class ServerArgs:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None  # default: --model as given, or the embedded default's name
    max_waiting_requests: int = 1024  # admissions beyond this many waiting requests get 503
    shutdown_timeout_s: float = 30.0  # drain time for open requests on shutdown
    log_level: str = "info"
    access_log: bool = True


def build_server(engine_args: EngineArgs, server_args: ServerArgs) -> tuple[FastAPI, AsyncEngine]:
    """Load the model, start the engine thread and build the app (not yet listening)."""
    started = time.perf_counter()
    engine = LLMEngine.from_args(engine_args)
    cfg = engine.config
    name = server_args.served_model_name or engine_args.model or DEFAULT_MODEL_NAME
    summary = format_summary(engine_summary(engine, name, time.perf_counter() - started))
    metrics = ServerMetrics(name, engine.kv_manager.num_kvp_groups)
    async_engine = AsyncEngine(engine, metrics, server_args.max_waiting_requests)
    tokenizer = load_tokenizer(cfg.model_dir, cfg.chat_template)  # the loop's own instance: HF tokenizers are not thread-safe
    ctx = ServingContext(
        engine=async_engine,
        tokenizer=tokenizer,
        model_name=name,
        max_model_len=cfg.scheduler.max_model_len,
        max_request_tokens=min(cfg.scheduler.max_model_len, engine.kv_manager.capacity_tokens_per_request),
        vocab_size=cfg.model.vocab_size,
    )
    logger.info("engine ready:\n%s", summary)
    return build_app(ctx, metrics, server_args.api_key), async_engine


def _uvicorn_config(app: FastAPI, args: ServerArgs) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=args.access_log,
        timeout_graceful_shutdown=args.shutdown_timeout_s,
        timeout_keep_alive=30,
    )


def serve(engine_args: EngineArgs, server_args: ServerArgs) -> int:
    """Run until Ctrl-C / SIGTERM. Returns the process exit code."""
    logging.basicConfig(level=server_args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    sock = bind_port(server_args.host, server_args.port)  # before the model loads
    try:
        app, async_engine = build_server(engine_args, server_args)
        server = uvicorn.Server(_uvicorn_config(app, server_args))
        logger.info("serving on http://%s:%d/v1", server_args.host, server_args.port)
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown
            pass
        finally:
            async_engine.stop()  # a no-op when the lifespan already stopped it
    finally:
        sock.close()
    return 0 if server.started else 1


def bind_port(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), as uvicorn would bind it; ConfigError if taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror} (use --port to pick another)") from e
    sock.set_inheritable(True)
    return sock


class BackgroundServer:
    """uvicorn on a daemon thread of this process; `with BackgroundServer(...) as s: s.url`."""

    def __init__(self, engine_args: EngineArgs, server_args: ServerArgs | None = None) -> None:
        args = server_args or ServerArgs(port=0, access_log=False, log_level="warning")
        if args.port == 0:
            args = dataclasses.replace(args, port=free_port(args.host))
        self.args = args
        self.app, self.async_engine = build_server(engine_args, args)
        self._server = uvicorn.Server(_uvicorn_config(self.app, args))
        self._thread = threading.Thread(target=self._server.run, name="mnemosyne-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.args.host}:{self.args.port}"

    def start(self, timeout_s: float = 30.0) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.async_engine.stop()
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self, timeout_s: float = 60.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout_s)
        self.async_engine.stop()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
