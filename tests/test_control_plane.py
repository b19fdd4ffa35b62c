"""The control plane: authenticated messages, liveness, and loud, short deaths.

* The codec drops forged, unauthenticated, pickled, old-version and garbage frames and
  counts each reason; a pickle carrying code never runs (a sentinel file is not made).
* Heartbeats keep coming while the main thread computes; a secret file must be 0600.
* `mnemosyne serve --tp 2` as a command (API server -> engine core -> 2 workers):
  - every listening control port (the server's engine port, the core's worker port) gets
    garbage, pickles with a sentinel payload and forged frames: none executes, each is
    counted in /metrics, and the server keeps answering like one device; Ctrl-C then
    stops everything with exit code 0;
  - a SIGSTOPped worker fails the open stream (error event, [DONE]) within 15 s;
  - a killed worker, and a killed engine core, each make the server exit non-zero
    within 30 s, with no process left behind.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
import zmq
from conftest import TEST_DEVICE
from tiny_models import build_tiny_chat_model

from mnemosyne import LLM, SamplingParams
from mnemosyne.errors import ConfigError
from mnemosyne.parallel.messages import DriverMessage, Shutdown, WorkerMessage
from mnemosyne.server.launch import free_port
from mnemosyne.wire.auth import SECRET_ENV, SECRET_FILE_ENV, new_secret, require_secret, secret_from_env
from mnemosyne.wire.codec import Codec, RejectReason
from mnemosyne.wire.engine_core import StopEngine
from mnemosyne.wire.heartbeat import Heartbeat, Heartbeater

PROMPT = "the capital of France is"
MAX_TOKENS = 12


class _Sentinel:
    """Unpickling this creates a file: proof that a pickle was (or was not) executed."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_codec_drops_and_counts_every_bad_frame(tmp_path: Path) -> None:
    secret = new_secret()
    driver: Codec[WorkerMessage] = Codec(secret, WorkerMessage, "test driver")
    worker: Codec[DriverMessage] = Codec(secret, DriverMessage, "test worker")
    forger: Codec[DriverMessage] = Codec(new_secret(), DriverMessage, "forger")
    good = worker.encode(Heartbeat("rank-0", 1))
    assert driver.decode(good) == Heartbeat("rank-0", 1)
    sentinel = tmp_path / "pwned"
    frames = {
        RejectReason.SHORT: [b"", b"\x80", good[:20]],
        RejectReason.VERSION: [pickle.dumps(_Sentinel(sentinel)), b"MNEM\x00" + good[5:], b"x" * 100],
        RejectReason.MAC: [
            forger.encode(Heartbeat("rank-0", 1)),
            good[:-1] + bytes([good[-1] ^ 1]),
            good[:5] + b"\x00" * 32 + pickle.dumps(_Sentinel(sentinel)),
        ],
        RejectReason.DECODE: [worker.encode(Shutdown()), worker.encode({"type": "hello", "rank": "zero"})],
    }
    for reason, bad in frames.items():
        for frame in bad:
            assert driver.decode(frame) is None
        assert driver.rejected[reason] == len(bad), reason
    assert driver.num_rejected == sum(len(b) for b in frames.values())
    assert not sentinel.exists()


def test_heartbeats_keep_coming_during_compute() -> None:
    """The beat thread runs while the main thread computes (torch releases the GIL, and
    Python code yields it every few ms), so a long step is never taken for a hang."""
    secret = new_secret()
    codec: Codec[WorkerMessage] = Codec(secret, WorkerMessage, "test driver")
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    beater = Heartbeater(f"tcp://127.0.0.1:{port}", "rank-0", secret).start()
    try:
        t0 = time.monotonic()
        a = torch.randn(256, 256)
        while time.monotonic() - t0 < 4.5:  # "a long step": matmuls and Python, never polling
            a = torch.tanh(a @ a)
            sum(range(10_000))
        seqs = []
        while router.poll(100):
            identity, frame = router.recv_multipart()
            beat = codec.decode(frame)
            assert identity == b"rank-0-hb" and isinstance(beat, Heartbeat)
            seqs.append(beat.seq)
        assert len(seqs) >= 4 and seqs == list(range(len(seqs))), seqs  # one a second, none lost
    finally:
        beater.stop()
        router.close(linger=0)
        ctx.term()


def test_secret_file_must_be_private_and_well_formed(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "secret"
    path.write_text(new_secret().hex() + "\n")
    monkeypatch.delenv(SECRET_ENV, raising=False)
    monkeypatch.setenv(SECRET_FILE_ENV, str(path))
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        secret_from_env()
    path.chmod(0o600)
    assert secret_from_env() == bytes.fromhex(path.read_text())
    path.write_text("abcd")
    with pytest.raises(ConfigError, match="64 hex digits"):
        secret_from_env()
    monkeypatch.delenv(SECRET_FILE_ENV)
    with pytest.raises(ConfigError, match=SECRET_FILE_ENV):
        require_secret("--driver-address")


# ---- mnemosyne serve as a command -----------------------------------------------------------


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    return build_tiny_chat_model(tmp_path_factory.mktemp("control_model"))


@pytest.fixture(scope="module")
def expected_text(chat_model: Path) -> str:
    with LLM(model=str(chat_model), device=TEST_DEVICE, kv_cache_memory_gb=0.05) as llm:
        return llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))[0].text


class Serve:
    """`mnemosyne serve MODEL -tp 2` in a subprocess, up and answering /health."""

    def __init__(self, model: Path, *extra_args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "mnemosyne.cli", "serve", str(model), "--port", str(self.port)]  # vLLM's spelling
        cmd += ["--device", TEST_DEVICE, "-tp", "2", "--kv-cache-memory-gb", "0.05", "--no-access-log", *extra_args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 180
        while True:
            assert self.proc.poll() is None, self.proc.stdout.read()
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        core = _children(self.proc.pid)
        assert len(core) == 1, core
        self.core = core[0]
        self.workers = _children(self.core)
        assert len(self.workers) == 2, self.workers
        self.pids = [self.proc.pid, self.core, *self.workers]

    def complete(self, **body) -> dict:
        body = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, **body}
        return httpx.post(self.url + "/v1/completions", json=body, timeout=60).json()

    def assert_exits(self, within_s: float, nonzero: bool) -> str:
        """Wait for the server to exit; then no process of its tree may be left."""
        try:
            code = self.proc.wait(timeout=within_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the server did not exit within {within_s} s")
        log = self.proc.stdout.read()
        assert (code != 0) == nonzero, (code, log)
        deadline = time.monotonic() + 5  # reaping the last child may trail the exit slightly
        while left := [p for p in self.pids if _alive(p)]:
            assert time.monotonic() < deadline, f"processes left behind: {left}\n{log}"
            time.sleep(0.1)
        return log

    def close(self) -> None:
        for pid in self.pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait()


def test_control_ports_drop_forged_messages_and_serve_on(
    chat_model: Path, expected_text: str, tmp_path: Path
):
    srv = Serve(chat_model)
    try:
        # The server's engine-core port and the core's worker port (workers listen only for gloo).
        ports = [p for pid in (srv.proc.pid, srv.core) for p in _listening_ports(pid) if p != srv.port]
        assert len(ports) == 2, ports
        sentinel = tmp_path / "pwned"
        forged = Codec(new_secret(), DriverMessage, "forger")
        for port in ports:
            with socket.create_connection(("127.0.0.1", port)) as s:  # not even ZMTP
                s.sendall(os.urandom(4096))
            ctx = zmq.Context()
            for identity in (b"engine-core", b"rank-0", b"rank-1-hb", b"intruder"):
                sock = ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.IDENTITY, identity)
                sock.setsockopt(zmq.LINGER, 1000)
                sock.connect(f"tcp://127.0.0.1:{port}")
                sock.send(pickle.dumps(_Sentinel(sentinel)))
                sock.send(forged.encode(Shutdown()))
                sock.send(forged.encode(StopEngine()))
                sock.send(b"MNEM\x01" + os.urandom(200))
                sock.close()
            ctx.term()
        time.sleep(1.0)
        res = srv.complete()
        assert res["choices"][0]["text"] == expected_text
        assert not sentinel.exists()
        metrics = httpx.get(srv.url + "/metrics").text
        for port in ("engine", "workers"):
            m = re.search(rf'control_messages_rejected_total{{[^}}]*port="{port}"[^}}]*}} (\S+)', metrics)
            assert m and float(m.group(1)) >= 4, (port, m)
        assert httpx.get(srv.url + "/health").status_code == 200
        srv.proc.send_signal(signal.SIGINT)
        log = srv.assert_exits(within_s=60, nonzero=False)
        for line in ("engine ready:", "tp 2 x spp 1 x kvp 1 (2 worker(s))", "KV capacity", "LlamaForCausalLM"):
            assert line in log, log  # the start-up summary, built in the engine core
    finally:
        srv.close()


def test_sigstopped_worker_fails_the_stream_within_15_s(chat_model: Path) -> None:
    # a 5-s heartbeat timeout (10 s by default) leaves the detection 10 s on a loaded 2-core CI
    srv = Serve(chat_model, "--heartbeat-timeout-s", "5")
    try:
        body = {"prompt": "x", "stream": True, "max_tokens": 900, "ignore_eos": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: {"))
            os.kill(srv.workers[1], signal.SIGSTOP)
            t0 = time.monotonic()
            events = [line for line in lines if line.startswith("data: ")]
            elapsed = time.monotonic() - t0
        assert elapsed < 15, elapsed
        error = json.loads(events[-2][6:])["error"]
        assert "heartbeat" in error["message"] and events[-1] == "data: [DONE]", events[-3:]
        log = srv.assert_exits(within_s=30, nonzero=True)
        assert "heartbeat" in log
    finally:
        srv.close()


@pytest.mark.parametrize("victim", ["worker", "engine core"])
def test_killed_process_makes_the_server_exit_nonzero(chat_model: Path, victim: str) -> None:
    srv = Serve(chat_model)
    try:
        os.kill(srv.workers[0] if victim == "worker" else srv.core, signal.SIGKILL)
        log = srv.assert_exits(within_s=30, nonzero=True)
        assert "the engine died" in log, log
    finally:
        srv.close()


# ---- process helpers ------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return sorted(int(p) for p in out.split())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    try:
        return status.read_text().split()[2] != "Z"
    except OSError:
        return False


def _listening_ports(pid: int) -> list[int]:
    """TCP ports process `pid` listens on (its socket inodes matched in /proc/net/tcp)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = []
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        cols = line.split()
        if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
            ports.append(int(cols[1].split(":")[1], 16))
    return ports


def test_a_send_to_a_rank_without_a_connection_is_a_worker_error() -> None:
    """A rank whose control connection closed (a killed worker not yet reaped) makes the
    driver's send raise `PeerUnreachable`, which the executor turns into a `WorkerError`
    naming the rank and what it was sending, its workers stopped; never a raw ZMQError."""
    from types import SimpleNamespace

    from mnemosyne.errors import WorkerError
    from mnemosyne.executor.multiproc import MultiProcExecutor
    from mnemosyne.parallel.transport import DriverChannel, PeerUnreachable
    from mnemosyne.wire.plan import StepPlan

    channel = DriverChannel(new_secret())
    try:
        with pytest.raises(PeerUnreachable, match="worker rank 3 is unreachable"):
            channel.broadcast([3], Shutdown())
        executor = object.__new__(MultiProcExecutor)  # no workers: only the channel's failure path
        executor.channel, executor.ranks, executor.local, executor._closed = channel, [3], None, False
        executor._finalizer = SimpleNamespace(detach=lambda: None)
        with pytest.raises(WorkerError, match=r"worker rank 3 is unreachable.*\(sending step 7\)"):
            executor.submit(StepPlan(step_id=7, chunks=()))
        assert executor._closed
        with pytest.raises(WorkerError, match="stopped"):
            executor.submit(StepPlan(step_id=8, chunks=()))
    finally:
        channel.close()


def test_a_core_gone_after_its_hello_is_an_engine_core_error() -> None:
    """The API server's start-up send to an engine core whose connection has closed raises
    EngineCoreError saying why (its exit code when it has exited), never a raw ZMQError."""
    from types import SimpleNamespace

    from mnemosyne.errors import EngineCoreError
    from mnemosyne.server.core_process import CoreProcess
    from mnemosyne.wire.codec import Codec
    from mnemosyne.wire.engine_core import CoreToServer, StopEngine

    core = object.__new__(CoreProcess)  # no process: only the send's failure path
    core._ctx = zmq.Context()
    core._sock = core._ctx.socket(zmq.ROUTER)
    core._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    core.codec = Codec(new_secret(), CoreToServer, "test")
    core.heartbeat_timeout_s, core.last_beat = 10.0, None
    try:
        core.proc = SimpleNamespace(poll=lambda: None)
        with pytest.raises(EngineCoreError, match="cannot be reached: its control connection is closed"):
            core._send_now(StopEngine())
        core.proc = SimpleNamespace(poll=lambda: -9)
        with pytest.raises(EngineCoreError, match="exited with code -9"):
            core._send_now(StopEngine())
    finally:
        core._sock.close(linger=0)
        core._ctx.term()
