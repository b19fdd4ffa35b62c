"""Liveness that does not depend on compute: a daemon thread beating over its own socket.

    process (worker rank r, or the engine core)           the side watching it
      main thread: compute, collectives, plans              (driver / API server)
      Heartbeater thread, DEALER "<sender>-hb"  ── Heartbeat(sender, seq) every 1 s ──>  last_beat[sender]
                                                <── HeartbeatStop(reason) ──  on failure or shutdown: exit now

The thread only needs the GIL for microseconds, and torch releases the GIL inside
its kernels and collectives, so beats keep coming while a minutes-long chunk
runs; they stop when the process is frozen (SIGSTOP, a hung host) or gone. The
watching side declares a peer dead after `heartbeat_timeout_s` of silence.

The beater also ends its process (`os._exit`) when told to stop (a worker blocked in
a collective whose peer died cannot read its main channel) and, for local children,
when its parent process is gone (no orphans when the parent was SIGKILLed).
"""

from __future__ import annotations

import logging
import os
import threading

import msgspec
import zmq

from mnemosyne.wire.codec import MAX_FRAME_BYTES, Codec

HEARTBEAT_INTERVAL_S = 1.0
EXIT_CODE_STOPPED = 3  # the process was told to stop, or lost its parent

logger = logging.getLogger(__name__)


class Heartbeat(msgspec.Struct, tag="heartbeat", frozen=True):
    sender: str
    seq: int


class HeartbeatStop(msgspec.Struct, tag="heartbeat_stop", frozen=True):
    reason: str


def heartbeat_identity(sender: str) -> bytes:
    return f"{sender}-hb".encode()


class Heartbeater:
    def __init__(self, address: str, sender: str, secret: bytes, parent_pid: int | None = None) -> None:
        self.address = address
        self.sender = sender
        self.parent_pid = parent_pid
        self._codec: Codec[HeartbeatStop] = Codec(secret, HeartbeatStop, f"heartbeat {sender}")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"{sender}-heartbeat", daemon=True)

    def start(self) -> Heartbeater:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5 * HEARTBEAT_INTERVAL_S)

    def _run(self) -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, heartbeat_identity(self.sender))
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 4)  # a peer that does not read gets the latest beats only
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        sock.connect(self.address)
        seq = 0
        try:
            while not self._stop.is_set():
                try:
                    sock.send(self._codec.encode(Heartbeat(self.sender, seq)), zmq.NOBLOCK)
                except zmq.Again:
                    pass
                seq += 1
                if sock.poll(int(HEARTBEAT_INTERVAL_S * 1000)):
                    msg = self._codec.decode(sock.recv(), "the watching side")
                    if isinstance(msg, HeartbeatStop):
                        self._exit(f"told to stop: {msg.reason}")
                if self.parent_pid is not None and os.getppid() != self.parent_pid:
                    self._exit(f"parent process {self.parent_pid} is gone")
        finally:
            sock.close(linger=0)
            ctx.term()

    def _exit(self, why: str) -> None:
        logger.error("%s exits: %s", self.sender, why)
        os._exit(EXIT_CODE_STOPPED)
