"""Start the server: `serve()` for `mnemosyne serve` (blocks, Ctrl-C or SIGTERM drains),
`BackgroundServer` for tests and benchmarks (uvicorn on a thread of this process).
Both start the engine core process (`engine/core.py`) and wait for its model.

`serve()` binds its port before loading the model (a port in use fails at once) and logs
the start-up summary (engine/summary.py) once the engine is ready.

Shutdown order: uvicorn stops accepting, waits up to `shutdown_timeout_s` for open
requests to finish (drain), cancels the rest (their handles abort them), then the
app's lifespan stops the engine core, which aborts anything left and stops the
worker processes.

When the engine dies (a worker died or froze, the core was killed), open streams
get an error event and [DONE], /health answers 503, the cause is logged, and
`serve()` shuts uvicorn down and returns 1 within `_DEATH_EXIT_S` (the process is
ended hard if uvicorn does not stop in time): a supervisor sees the failure.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI

from mnemosyne.engine.args import EngineArgs, read_chat_template
from mnemosyne.engine.llm_engine import load_tokenizer
from mnemosyne.engine.summary import format_summary
from mnemosyne.errors import ConfigError
from mnemosyne.gc_heap import prepare_to_serve
from mnemosyne.models.default_model import DEFAULT_MODEL_NAME
from mnemosyne.server.api_server import build_app
from mnemosyne.server.async_engine import AsyncEngine
from mnemosyne.server.prompt_tokenizer import PromptTokenizer
from mnemosyne.server.serving import ServingContext

logger = logging.getLogger("mnemosyne.server")

_DEATH_EXIT_S = 20.0  # after the engine died: uvicorn's drain, then a hard exit


@dataclass(frozen=True)
class ServerArgs:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None  # default: --model as given, or the embedded default's name
    max_waiting_requests: int = 1024  # admissions beyond this many waiting requests get 503
    shutdown_timeout_s: float = 30.0  # drain time for open requests on shutdown
    # Work one API call may ask for: sum over its choices of prompt + max_tokens (or the
    # room a chat call without max_tokens gets). Beyond it: 400 naming the limit.
    # None: 4 full-context requests (4 x the per-request token limit).
    max_tokens_per_call: int | None = None
    log_level: str = "info"
    access_log: bool = True


def build_server(engine_args: EngineArgs, server_args: ServerArgs) -> tuple[FastAPI, AsyncEngine]:
    """Start the engine core process, wait for its model and build the app (not yet listening)."""
    name = server_args.served_model_name or engine_args.model or DEFAULT_MODEL_NAME
    async_engine = AsyncEngine(engine_args, name, server_args.max_waiting_requests)
    info = async_engine.info
    tokenizer = load_tokenizer(info.model_dir, read_chat_template(engine_args.chat_template))
    ctx = ServingContext(
        engine=async_engine,
        tokenizer=tokenizer,
        prompts=PromptTokenizer(tokenizer),
        model_name=name,
        max_model_len=info.max_model_len,
        max_request_tokens=info.max_request_tokens,
        vocab_size=info.vocab_size,
        max_tokens_per_call=server_args.max_tokens_per_call or 4 * info.max_request_tokens,
    )
    logger.info("engine ready:\n%s", format_summary(info.summary))
    return build_app(ctx, async_engine.metrics, server_args.api_key), async_engine


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
    except BaseException:
        sock.close()
        raise
    server = uvicorn.Server(_uvicorn_config(app, server_args))

    def on_engine_death(reason: str) -> None:
        logger.error("shutting down: the engine died (%s)", reason)
        server.should_exit = True
        timer = threading.Timer(_DEATH_EXIT_S, _hard_exit, args=(reason,))
        timer.daemon = True
        timer.start()

    async_engine.on_dead(on_engine_death)
    prepare_to_serve("API server")
    logger.info("serving on http://%s:%d/v1", server_args.host, server_args.port)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown
        pass
    finally:
        async_engine.stop()  # a no-op when the lifespan already stopped it
        sock.close()
    if async_engine.failed:
        logger.error("exiting with code 1: the engine died (%s)", async_engine.dead_reason)
        return 1
    return 0 if server.started else 1


def _hard_exit(reason: str) -> None:
    logger.error(
        "uvicorn did not stop within %.0f s after the engine died (%s): exiting", _DEATH_EXIT_S, reason
    )
    logging.shutdown()
    os._exit(1)


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
