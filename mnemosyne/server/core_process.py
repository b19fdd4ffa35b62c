"""The API server's end of the engine core process: start it, talk to it, watch it.

    API server process                                    engine core process
    ──────────────────                                    ───────────────────
    ROUTER tcp://127.0.0.1:<random>  <── DEALER "engine-core"      (messages)
                                     <── DEALER "engine-core-hb"   (heartbeats)
    io thread: the only user of the ROUTER
      frames queued by send() (any thread) via an inproc pair ──> core
      core messages ──> on_message(msg)          (the AsyncEngine's handlers)
      every 0.2 s: core process exited? silent for heartbeat_timeout_s? ──> on_dead(reason)

Every frame is signed and checked (`wire/codec.py`, a fresh secret per launch handed
to the core in its environment, distinct from the workers' secret). A frame that
fails, or a valid one from an identity other than the core's, is dropped and counted
(`codec.rejected`).
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import torch
import zmq

from mnemosyne.engine.args import EngineArgs
from mnemosyne.errors import EngineCoreError
from mnemosyne.wire.auth import CORE_SECRET_ENV, new_secret, secret_env
from mnemosyne.wire.codec import MAX_FRAME_BYTES, Codec, RejectReason, peer_name
from mnemosyne.wire.engine_core import (
    CORE_IDENTITY,
    CORE_SENDER,
    ArgValue,
    CoreHello,
    CoreReady,
    CoreToServer,
    EngineDead,
    EngineInfo,
    StartEngine,
    StopEngine,
)
from mnemosyne.wire.heartbeat import Heartbeat, heartbeat_identity

logger = logging.getLogger("mnemosyne.server")

_POLL_MS = 200
_CORE_HB_IDENTITY = heartbeat_identity(CORE_SENDER)
_instances = itertools.count()


def engine_args_dict(args: EngineArgs) -> dict[str, ArgValue]:
    """EngineArgs as plain values (dtypes and enums by name) for `StartEngine`."""
    out: dict[str, ArgValue] = {}
    for f in dataclasses.fields(args):
        v = getattr(args, f.name)
        if isinstance(v, torch.dtype):
            v = str(v).removeprefix("torch.")
        elif isinstance(v, enum.Enum):
            v = v.value
        out[f.name] = v
    return out


class CoreProcess:
    def __init__(self, engine_args: EngineArgs, max_waiting_requests: int, model_name: str) -> None:
        secret = new_secret()
        self.codec: Codec[CoreToServer] = Codec(secret, CoreToServer, "API server control port")
        self.heartbeat_timeout_s = engine_args.heartbeat_timeout_s
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        port = self._sock.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"
        inproc = f"inproc://mnemosyne-core-{os.getpid()}-{next(_instances)}"
        self._rx = self._ctx.socket(zmq.PAIR)
        self._rx.bind(inproc)
        self._tx = self._ctx.socket(zmq.PAIR)
        self._tx.connect(inproc)
        self._tx_lock = threading.Lock()
        self.last_beat: float | None = None  # the core's imports take a while before it beats
        cmd = [sys.executable, "-m", "mnemosyne.engine.core", "--address", self.address]
        cmd += ["--parent-pid", str(os.getpid())]
        level = logging.getLevelName(logging.getLogger("mnemosyne").getEffectiveLevel())
        env = {"MNEMOSYNE_LOG_LEVEL": level, **os.environ, **secret_env(secret, CORE_SECRET_ENV)}
        self.proc = subprocess.Popen(cmd, env=env)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            self.info = self._handshake(engine_args, max_waiting_requests, model_name)
        except BaseException:
            self._kill()
            self._close()
            raise

    # ---- start-up (constructor thread, before the io thread exists) -------------------

    def _handshake(self, engine_args: EngineArgs, max_waiting_requests: int, model_name: str) -> EngineInfo:
        hello = self._wait_for(CoreHello, "connect")
        logger.info("engine core process %d connected", hello.pid)
        self._send_now(StartEngine(engine_args_dict(engine_args), max_waiting_requests, model_name))
        return self._wait_for(CoreReady, "load the model").info

    def _wait_for(self, kind: type, what: str):  # -> instance of kind
        while True:
            msg = self._recv(_POLL_MS)
            if isinstance(msg, EngineDead):
                raise EngineCoreError(f"the engine core failed to {what}: {msg.reason}")
            if isinstance(msg, kind):
                return msg
            if (reason := self.check_alive()) is not None:
                raise EngineCoreError(f"the engine core failed to {what}: {reason}")

    # ---- shared by both phases ---------------------------------------------------------

    def _recv(self, timeout_ms: int) -> CoreToServer | None:
        """One message from the core (heartbeats noted, rejected frames dropped), or None."""
        if not self._sock.poll(timeout_ms):
            return None
        routed = self.codec.decode_routed(self._sock.recv_multipart())
        if routed is None:
            return None
        identity, msg = routed
        if isinstance(msg, Heartbeat):
            if identity != _CORE_HB_IDENTITY or msg.sender != CORE_SENDER:
                return self.codec.reject(RejectReason.PEER, peer_name(identity), "heartbeat from a stranger")
            self.last_beat = time.monotonic()
            return None
        if identity != CORE_IDENTITY:
            return self.codec.reject(
                RejectReason.PEER, peer_name(identity), f"{type(msg).__name__} from a stranger"
            )
        return msg

    def check_alive(self) -> str | None:
        """None while the core runs and beats, else why it is considered dead."""
        code = self.proc.poll()
        if code is not None:
            return f"the engine core process exited with code {code}"
        silent_s = 0.0 if self.last_beat is None else time.monotonic() - self.last_beat
        if silent_s > self.heartbeat_timeout_s:
            return f"the engine core sent no heartbeat for {silent_s:.0f} s (frozen or hung)"
        return None

    def _send_now(self, msg: object) -> None:
        """Send at once (start-up, before the io thread): a core whose connection closed
        (it died after its hello) is an EngineCoreError, not a raw ZMQError."""
        try:
            self._sock.send_multipart([CORE_IDENTITY, self.codec.encode(msg)])
        except zmq.ZMQError as e:
            reason = self.check_alive() or f"its control connection is closed ({e})"
            raise EngineCoreError(f"the engine core cannot be reached: {reason}") from e

    # ---- running -----------------------------------------------------------------------

    def start(self, on_message: Callable[[CoreToServer], None], on_dead: Callable[[str], None]) -> None:
        self._thread = threading.Thread(
            target=self._io, args=(on_message, on_dead), name="mnemosyne-core-io", daemon=True
        )
        self._thread.start()

    def send(self, msg: object) -> None:
        """Queue a message for the core (any thread)."""
        frame = self.codec.encode(msg)
        with self._tx_lock:
            if not self._tx.closed:
                self._tx.send(frame)

    def _io(self, on_message: Callable[[CoreToServer], None], on_dead: Callable[[str], None]) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._rx, zmq.POLLIN)
        try:
            while not self._stopping.is_set():
                ready = dict(poller.poll(_POLL_MS))
                while self._rx.poll(0):
                    try:
                        self._sock.send_multipart([CORE_IDENTITY, self._rx.recv()])
                    except zmq.ZMQError:  # the core is gone: on_dead follows
                        pass
                if self._sock in ready:
                    while (msg := self._recv(0)) is not None or self._sock.poll(0):
                        if msg is not None:
                            on_message(msg)
                if self._stopping.is_set():
                    break
                if (reason := self.check_alive()) is not None:
                    self._kill()
                    on_dead(reason)
                    return
        except Exception as e:  # a bug here must not leave the server up without an engine
            logger.exception("engine core io thread failed")
            self._kill()
            on_dead(f"engine core io thread failed: {e!r}")

    # ---- shutdown ----------------------------------------------------------------------

    def stop(self, timeout_s: float) -> None:
        """Ask the core to stop (it aborts what is left and stops its workers); kill it
        if it has not exited after `timeout_s`. Idempotent."""
        if self._stopping.is_set():
            return
        self.send(StopEngine())
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            logger.error("the engine core did not stop within %.0f s: killing it", timeout_s)
        self._stopping.set()
        self._kill()
        if self._thread is not None:
            self._thread.join(5.0)
        self._close()

    def _kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # its workers follow: they watch their parent
        self.proc.wait()

    def _close(self) -> None:
        with self._tx_lock:
            for s in (self._tx, self._rx, self._sock):
                s.close(linger=0)
        self._ctx.term()
