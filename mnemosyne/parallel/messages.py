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

Messages are pickled dataclasses; the channel is trusted (loopback by default).
"""

from __future__ import annotations

from dataclasses import dataclass

from mnemosyne.config import EngineConfig
from mnemosyne.engine.step_plan import StepPlan, StepResult


@dataclass(frozen=True)
class WorkerHello:
    rank: int
    host: str
    pid: int


@dataclass(frozen=True)
class InitWorker:
    config: EngineConfig


@dataclass(frozen=True)
class WorkerReady:
    rank: int


@dataclass(frozen=True)
class RunStep:
    plan: StepPlan


@dataclass(frozen=True)
class StepDone:
    rank: int
    result: StepResult


@dataclass(frozen=True)
class Shutdown:
    pass


@dataclass(frozen=True)
class WorkerFailed:
    rank: int
    error: str  # formatted traceback


DriverMessage = InitWorker | RunStep | Shutdown
WorkerMessage = WorkerHello | WorkerReady | StepDone | WorkerFailed
