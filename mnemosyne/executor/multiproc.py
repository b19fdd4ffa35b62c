"""Run plans on worker processes, one per device (TP x SPP x KVP layouts).

    submit(plan)   -> RunStep(plan) to every rank (ranks run plans in order)
    get_result()   -> wait for the oldest plan's StepDone from the reporting rank of
                      every KVP group (last stage, tp rank 0) and merge them

Several plans may be in flight: the engine's `max_inflight` (a pipeline's micro-batches,
or two with async scheduling, whose plan n+1 a reporting rank may launch before it
reports plan n: worker/main.py); results are taken oldest first, whatever order the
StepDones of different plans and groups arrive in.
    fill_synthetic_kv(request_id, seed)   (benchmark-only)
                   -> FillSyntheticKV to every rank (ordered after every plan sent so
                      before), then wait for every rank's SyntheticKVFilled

Liveness: while waiting, the driver polls the channel in short slices; a
`WorkerFailed` message, a local worker that exited, a worker silent for
`parallel.heartbeat_timeout_s` (its heartbeat thread beats every second, compute
or not), or no reply within `parallel.timeout_s` (the collective timeout too)
raises `WorkerError` (and the workers are stopped) rather than hanging the engine; so
does a send to a rank whose connection has closed (`PeerUnreachable`: a killed worker
whose exit has not been reaped yet).
`check_health()` does the same checks while the engine is idle.

Security: messages are signed with the control secret (`wire/auth.py`): a fresh one
per launch for local workers, the one given in the environment with
`driver_address` (required there, shared with the torchrun workers).
"""

from __future__ import annotations

import time
import weakref
from collections import deque

from mnemosyne.config import EngineConfig
from mnemosyne.errors import WorkerError
from mnemosyne.parallel.groups import rank_of
from mnemosyne.parallel.launch import LocalWorkers, launch_local_workers
from mnemosyne.parallel.messages import (
    DriverMessage,
    FillSyntheticKV,
    InitWorker,
    RunStep,
    Shutdown,
    StepDone,
    SyntheticKVFilled,
    WorkerFailed,
    WorkerHello,
    WorkerMessage,
    WorkerReady,
)
from mnemosyne.parallel.transport import DriverChannel, PeerUnreachable
from mnemosyne.wire.auth import new_secret, require_secret, secret_from_env
from mnemosyne.wire.plan import StepPlan, StepResult

_POLL_S = 0.2
_SHUTDOWN_WAIT_S = 15.0


class MultiProcExecutor:
    def __init__(self, config: EngineConfig) -> None:
        p = config.parallel
        self.config = config
        self.world_size = p.world_size
        self.ranks = list(range(self.world_size))
        self.reporting_ranks = [rank_of(p, g, p.spp - 1, 0) for g in range(p.kvp)]
        self.timeout_s = p.timeout_s
        self.heartbeat_timeout_s = p.heartbeat_timeout_s
        if p.driver_address is not None:
            secret = require_secret("--driver-address")
        else:
            secret = secret_from_env() or new_secret()
        self.channel = DriverChannel(secret, p.driver_address or "tcp://127.0.0.1:0")
        self.local: LocalWorkers | None = None
        if p.driver_address is None:
            self.local = launch_local_workers(self.world_size, self.channel.address, secret)
        self._finalizer = weakref.finalize(self, _kill, self.channel, self.local)
        self._inflight: deque[int] = deque()  # step ids, oldest first
        self._done: dict[int, dict[int, StepResult]] = {}  # step id -> reporting rank -> result
        self._closed = False
        try:
            self._handshake()
        except BaseException:
            self.shutdown()
            raise

    def _handshake(self) -> None:
        hello: dict[int, WorkerHello] = {}
        while len(hello) < self.world_size:
            msg = self._recv(f"{len(hello)}/{self.world_size} workers connected")
            if not isinstance(msg, WorkerHello) or not 0 <= msg.rank < self.world_size or msg.rank in hello:
                raise WorkerError(f"unexpected message while waiting for workers: {msg!r}")
            hello[msg.rank] = msg
        self._broadcast(InitWorker(self.config), "sending the engine config")
        ready: set[int] = set()
        while len(ready) < self.world_size:
            msg = self._recv(f"{len(ready)}/{self.world_size} workers loaded the model")
            if not isinstance(msg, WorkerReady):
                raise WorkerError(f"unexpected message while workers load the model: {msg!r}")
            ready.add(msg.rank)

    # ---- steps ------------------------------------------------------------------------------

    def submit(self, plan: StepPlan) -> None:
        self._check_open()
        self._broadcast(RunStep(plan), f"sending step {plan.step_id}")
        self._inflight.append(plan.step_id)
        self._done[plan.step_id] = {}

    def get_result(self) -> StepResult:
        self._check_open()
        step_id = self._inflight[0]
        parts = self._done[step_id]
        while len(parts) < len(self.reporting_ranks):
            msg = self._recv(f"step {step_id}: {len(parts)}/{len(self.reporting_ranks)} KVP groups reported")
            self._on_step_done(msg)
        self._inflight.popleft()
        del self._done[step_id]
        merged = StepResult(step_id)
        for r in self.reporting_ranks:
            merged.update(parts[r])
        return merged

    def fill_synthetic_kv(self, request_id: str, seed: int) -> list[SyntheticKVFilled]:
        """BENCHMARK-ONLY: every rank writes N(0, 1) K/V into the blocks it mirrors for the
        request (worker/synthetic_kv.py). Ranks take messages in order, so the fill runs
        after every plan submitted before it; returns every rank's answer, by rank, once
        all of them are done (results of plans still in flight are kept meanwhile)."""
        self._check_open()
        self._broadcast(FillSyntheticKV(request_id, seed), f"sending the synthetic KV fill of {request_id!r}")
        filled: dict[int, SyntheticKVFilled] = {}
        while len(filled) < self.world_size:
            msg = self._recv(
                f"synthetic KV fill of {request_id!r}: {len(filled)}/{self.world_size} ranks done"
            )
            if isinstance(msg, SyntheticKVFilled) and msg.rank in self.ranks and msg.rank not in filled:
                filled[msg.rank] = msg
            else:
                self._on_step_done(msg)
        return [filled[r] for r in self.ranks]

    @property
    def num_rejected_messages(self) -> int:
        return self.channel.codec.num_rejected

    def check_health(self) -> None:
        """Between steps: raise WorkerError if a worker failed, died or stopped beating."""
        self._check_open()
        while (msg := self._poll("idle")) is not None:
            self._on_step_done(msg)

    def _on_step_done(self, msg: WorkerMessage) -> None:
        if (
            not isinstance(msg, StepDone)
            or msg.rank not in self.reporting_ranks
            or msg.result.step_id not in self._done
        ):
            self._fail(f"unexpected message from a worker: {msg!r:.300}")
        self._done[msg.result.step_id][msg.rank] = msg.result

    def _recv(self, waiting_for: str) -> WorkerMessage:
        deadline = time.monotonic() + self.timeout_s
        while True:
            msg = self._poll(waiting_for, _POLL_S)
            if msg is not None:
                return msg
            if time.monotonic() > deadline:
                self._fail(f"no reply from the workers within {self.timeout_s:.0f} s ({waiting_for})")

    def _poll(self, waiting_for: str, timeout_s: float = 0.0) -> WorkerMessage | None:
        """One valid message, or None; raises on any sign of a dead or frozen worker."""
        msg = self.channel.recv(timeout_s)
        if isinstance(msg, WorkerFailed):
            self._fail(self._dead_prefix() + f"worker rank {msg.rank} failed:\n{msg.error}")
        if msg is not None:
            return msg
        if self.local is not None and self.local.dead():
            self._fail_on_death(waiting_for)
        now = time.monotonic()
        silent = [r for r, t in sorted(self.channel.last_beat.items()) if now - t > self.heartbeat_timeout_s]
        if silent:
            self._fail(
                f"worker rank(s) {silent} sent no heartbeat for {self.heartbeat_timeout_s:.0f} s: frozen "
                f"(e.g. SIGSTOP), hung or their host is lost ({waiting_for})"
            )
        return None

    def _fail_on_death(self, waiting_for: str) -> None:
        """A worker process is gone: report its own error if it sent one, else who died."""
        deadline = time.monotonic() + 2.0  # a dying worker's WorkerFailed may still be in flight
        while time.monotonic() < deadline:
            msg = self.channel.recv(_POLL_S)
            if isinstance(msg, WorkerFailed):
                self._fail(self._dead_prefix() + f"worker rank {msg.rank} failed:\n{msg.error}")
        self._fail(self._dead_prefix() + f"({waiting_for})")

    def _dead_prefix(self) -> str:
        """'worker process died: rank r (exit code c); ' for local workers that exited."""
        if self.local is None:
            return ""
        time.sleep(_POLL_S)  # a peer's error often arrives just before the dead rank is reaped
        dead = self.local.dead()
        if not dead:
            return ""
        return "worker process died: " + ", ".join(f"rank {r} (exit code {c})" for r, c in dead) + "; "

    def _broadcast(self, msg: DriverMessage, doing: str) -> None:
        """Send `msg` to every rank; a rank whose connection is gone fails the engine."""
        try:
            self.channel.broadcast(self.ranks, msg)
        except PeerUnreachable as e:
            self._fail(self._dead_prefix() + f"{e} ({doing})")

    def _fail(self, message: str) -> None:
        self.shutdown(graceful=False)
        raise WorkerError(message)

    def _check_open(self) -> None:
        if self._closed:
            raise WorkerError("the engine's workers are stopped (an earlier failure or shutdown)")

    # ---- shutdown ---------------------------------------------------------------------------

    def shutdown(self, graceful: bool = True) -> None:
        if self._closed:
            return
        self._closed = True
        if not graceful:
            # Ranks blocked in a collective cannot read Shutdown: end them through their heartbeat thread.
            self.channel.stop_heartbeaters(self.ranks, "the driver stopped the workers after a failure")
        if graceful:
            try:
                self.channel.broadcast(self.ranks, Shutdown())
            except Exception:  # a worker that never connected cannot be addressed
                graceful = False
        if self.local is not None:
            if graceful:
                self.local.wait(_SHUTDOWN_WAIT_S)
            else:
                self.local.kill()
        self._finalizer.detach()
        self.channel.close()


def _kill(channel: DriverChannel, local: LocalWorkers | None) -> None:
    """Last resort at garbage collection / interpreter exit: no process outlives the engine."""
    if local is not None:
        local.kill()
    channel.close()
