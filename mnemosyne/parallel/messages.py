"""Typed control messages between the driver (engine) and worker processes.

    worker                                driver
      │ ── WorkerHello(rank) ──────────────> │   (after connecting)
      │ <───────────── InitWorker(config) ── │   (once every rank said hello)
      │   init_process_group, load shard, allocate KV
      │ ── WorkerReady(rank) ──────────────> │
      │ <────────────────── RunStep(plan) ── │   (every rank, every micro-batch, in order)
      │ ── StepDone(rank, result) ─────────> │   (reporting ranks: last stage, tp rank 0)
      │ <────────────────────── Shutdown() ─ │
      │ ── WorkerFailed(rank, traceback) ──> │   (on any exception, then the worker exits)
      heartbeat thread ── Heartbeat ───────> │   (every second, from the start: wire/heartbeat.py)

Each message is a msgspec `Struct` with its own tag: a frame decodes to exactly one of
the types the receiver expects (`DriverMessage` on workers, `WorkerMessage` on the
driver) or is dropped (`wire/codec.py`: versioned, HMAC-authenticated, never pickled).
"""

from __future__ import annotations

import msgspec

from mnemosyne.config import EngineConfig
from mnemosyne.wire.heartbeat import Heartbeat
from mnemosyne.wire.plan import StepPlan, StepResult


class WorkerHello(msgspec.Struct, tag="hello", frozen=True):
    rank: int
    host: str
    pid: int


class InitWorker(msgspec.Struct, tag="init", frozen=True):
    config: EngineConfig


class WorkerReady(msgspec.Struct, tag="ready", frozen=True):
    rank: int


class RunStep(msgspec.Struct, tag="run", frozen=True):
    plan: StepPlan


class StepDone(msgspec.Struct, tag="done", frozen=True):
    rank: int
    result: StepResult


class Shutdown(msgspec.Struct, tag="shutdown", frozen=True):
    pass


class WorkerFailed(msgspec.Struct, tag="failed", frozen=True):
    rank: int
    error: str  # formatted traceback


DriverMessage = InitWorker | RunStep | Shutdown
WorkerMessage = WorkerHello | WorkerReady | StepDone | WorkerFailed | Heartbeat
