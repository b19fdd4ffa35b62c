"""ZeroMQ control channel: one ROUTER socket on the driver, one DEALER per worker.

The driver binds (an ephemeral loopback port by default, or a fixed address for
workers on other machines); each worker connects with identity `rank-<r>`, and its
heartbeat thread with `rank-<r>-hb`, so the driver can address any rank and knows
who sent what. Every frame is signed and checked by `wire/codec.py`; the driver
also drops a message whose rank is not the sender's identity. A dropped frame is
counted (`rejected`) and never reaches the executor. Messages are encoded once and
the same bytes are sent to every rank.
"""

from __future__ import annotations

import time

import zmq

from mnemosyne.parallel.messages import DriverMessage, WorkerMessage
from mnemosyne.wire.codec import MAX_FRAME_BYTES, Codec, RejectReason, peer_name
from mnemosyne.wire.heartbeat import Heartbeat, HeartbeatStop, heartbeat_identity


def _identity(rank: int) -> bytes:
    return f"rank-{rank}".encode()


class PeerUnreachable(ConnectionError):
    """A rank the driver sends to has no connection (ROUTER_MANDATORY): its process died or
    hung up, or it never connected. The executor turns it into a `WorkerError`."""

    def __init__(self, rank: int) -> None:
        super().__init__(f"worker rank {rank} is unreachable: its control connection is closed")
        self.rank = rank


def _sender_rank(identity: bytes, msg: WorkerMessage) -> bool:
    """True when the message speaks for the rank that sent it."""
    if isinstance(msg, Heartbeat):
        return identity == heartbeat_identity(msg.sender) and msg.sender.startswith("rank-")
    return identity == _identity(msg.rank)


class DriverChannel:
    def __init__(self, secret: bytes, bind: str = "tcp://127.0.0.1:0") -> None:
        self.codec: Codec[WorkerMessage] = Codec(secret, WorkerMessage, "driver control port")
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sending to an unknown rank raises
        self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        host, _, port = bind.rpartition(":")
        if port == "0":
            port = str(self._sock.bind_to_random_port(host))
        else:
            self._sock.bind(bind)
        connect_host = host.replace("0.0.0.0", "127.0.0.1").replace("*", "127.0.0.1")
        self.address = f"{connect_host}:{port}"  # what local workers connect to
        # No disconnect events: anyone can connect and hang up, so only authenticated
        # signs (WorkerFailed, heartbeats) and local process exits count as a death.
        self.last_beat: dict[int, float] = {}  # rank -> time.monotonic() of its latest heartbeat

    def send(self, rank: int, msg: DriverMessage) -> None:
        self._send(rank, self.codec.encode(msg))

    def broadcast(self, ranks: list[int], msg: DriverMessage) -> None:
        payload = self.codec.encode(msg)
        for r in ranks:
            self._send(r, payload)

    def _send(self, rank: int, payload: bytes) -> None:
        try:
            self._sock.send_multipart([_identity(rank), payload])
        except zmq.ZMQError as e:
            if e.errno == zmq.EHOSTUNREACH:
                raise PeerUnreachable(rank) from e
            raise

    def stop_heartbeaters(self, ranks: list[int], reason: str) -> None:
        """Tell each rank's heartbeat thread to end its process (it may be stuck in a collective)."""
        payload = self.codec.encode(HeartbeatStop(reason))
        for r in ranks:
            try:
                self._sock.send_multipart([heartbeat_identity(f"rank-{r}"), payload], zmq.NOBLOCK)
            except zmq.ZMQError:  # never connected, or already gone
                pass

    def recv(self, timeout_s: float) -> WorkerMessage | None:
        """The next message from any worker, or None after `timeout_s`. Heartbeats (noted in
        `last_beat`) and dropped frames are consumed on the way, all that are queued."""
        if not self._sock.poll(int(timeout_s * 1000)):
            return None
        while self._sock.poll(0):
            msg = self._read()
            if msg is not None:
                return msg
        return None

    def _read(self) -> WorkerMessage | None:
        routed = self.codec.decode_routed(self._sock.recv_multipart())
        if routed is None:
            return None
        identity, msg = routed
        if not _sender_rank(identity, msg):
            return self.codec.reject(RejectReason.PEER, peer_name(identity), f"claims {msg!r:.80}")
        if isinstance(msg, Heartbeat):
            self.last_beat[int(msg.sender.removeprefix("rank-"))] = time.monotonic()
            return None
        return msg

    def close(self) -> None:
        if self._sock.closed:
            return
        self._sock.close(linger=0)
        self._ctx.term()


class WorkerChannel:
    def __init__(self, address: str, rank: int, secret: bytes) -> None:
        self.codec: Codec[DriverMessage] = Codec(secret, DriverMessage, f"worker rank {rank}")
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.IDENTITY, _identity(rank))
        self._sock.setsockopt(zmq.LINGER, 2000)  # let a final WorkerFailed get out
        self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        self._sock.connect(address)

    def send(self, msg: WorkerMessage) -> None:
        self._sock.send(self.codec.encode(msg))

    def recv(self) -> DriverMessage:
        """The next valid message from the driver (dropped frames are skipped)."""
        while True:
            msg = self.codec.decode(self._sock.recv(), "driver")
            if msg is not None:
                return msg

    def try_recv(self) -> DriverMessage | None:
        """The next valid message if one is queued, else None at once."""
        while self._sock.poll(0):
            msg = self.codec.decode(self._sock.recv(), "driver")
            if msg is not None:
                return msg
        return None

    def close(self) -> None:
        if not self._sock.closed:
            self._sock.close()
            self._ctx.term()
