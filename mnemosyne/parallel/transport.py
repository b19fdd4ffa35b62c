"""ZeroMQ control channel: one ROUTER socket on the driver, one DEALER per worker.

The driver binds (an ephemeral loopback port by default, or a fixed address for
workers on other machines); each worker connects with identity `rank-<r>`, so the
driver can address any rank and knows who sent what. Messages (`messages.py`)
are pickled once and the same bytes are sent to every rank.
"""

from __future__ import annotations

import pickle

import zmq
from zmq.utils.monitor import recv_monitor_message

from mnemosyne.parallel.messages import DriverMessage, WorkerMessage


def _identity(rank: int) -> bytes:
    return f"rank-{rank}".encode()


class DriverChannel:
    def __init__(self, bind: str = "tcp://127.0.0.1:0") -> None:
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sending to an unknown rank raises
        host, _, port = bind.rpartition(":")
        if port == "0":
            port = str(self._sock.bind_to_random_port(host))
        else:
            self._sock.bind(bind)
        connect_host = host.replace("0.0.0.0", "127.0.0.1").replace("*", "127.0.0.1")
        self.address = f"{connect_host}:{port}"  # what local workers connect to
        # A worker's TCP connection closing (its process died) shows up here.
        self._monitor = self._sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self.num_disconnects = 0

    def send(self, rank: int, msg: DriverMessage) -> None:
        self._sock.send_multipart([_identity(rank), pickle.dumps(msg)])

    def broadcast(self, ranks: list[int], msg: DriverMessage) -> None:
        payload = pickle.dumps(msg)
        for r in ranks:
            self._sock.send_multipart([_identity(r), payload])

    def recv(self, timeout_s: float) -> WorkerMessage | None:
        """The next message from any worker, or None after `timeout_s` (or on a disconnect,
        counted in `num_disconnects`)."""
        ready = dict(self._poller.poll(int(timeout_s * 1000)))
        if self._monitor in ready:
            recv_monitor_message(self._monitor)
            self.num_disconnects += 1
        if self._sock not in ready:
            return None
        _identity_frame, payload = self._sock.recv_multipart()
        return pickle.loads(payload)

    def close(self) -> None:
        if self._sock.closed:
            return
        self._sock.disable_monitor()
        self._monitor.close(linger=0)
        self._sock.close(linger=0)
        self._ctx.term()


class WorkerChannel:
    def __init__(self, address: str, rank: int) -> None:
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.IDENTITY, _identity(rank))
        self._sock.setsockopt(zmq.LINGER, 2000)  # let a final WorkerFailed get out
        self._sock.connect(address)

    def send(self, msg: WorkerMessage) -> None:
        self._sock.send(pickle.dumps(msg))

    def recv(self, timeout_s: float | None = None) -> DriverMessage | None:
        if timeout_s is not None and not self._sock.poll(int(timeout_s * 1000)):
            return None
        return pickle.loads(self._sock.recv())

    def close(self) -> None:
        if not self._sock.closed:
            self._sock.close()
            self._ctx.term()
