"""Typed control messages between the driver (engine) and worker processes.

    worker                                driver
      │ ── WorkerHello(rank) ──────────────> │   (after connecting)
      │ <───────────── InitWorker(config) ── │   (once every rank said hello)
      │   init_process_group, load shard, allocate KV
      │ ── WorkerReady(rank) ──────────────> │
      │ <────────────────── RunStep(plan) ── │   (every rank, every micro-batch, in order)
      │ ── StepDone(rank, result) ─────────> │   (reporting ranks: last stage, tp rank 0)
      │ <──── FillSyntheticKV(request, seed) │   (benchmark-only, every rank, in plan order)
      │ ── SyntheticKVFilled(rank, ...) ───> │   (every rank, once its fill is on the device)
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


class FillSyntheticKV(msgspec.Struct, tag="fill_synthetic_kv", frozen=True):
    """BENCHMARK-ONLY: write N(0, 1) K and V into every block that the rank's block-table
    mirror holds for `request_id` (every local layer), in the cache dtype, deterministic
    per (seed, rank). A rank without a piece of the request writes nothing.

    Ranks take driver messages one at a time, in order, so a fill sent after the last
    plan of a request's prefill runs after that plan and before the next one; each rank
    answers `SyntheticKVFilled` once its writes are done on the device, and the driver
    waits for every rank (`MultiProcExecutor.fill_synthetic_kv`). Used by the
    synthetic-KV decode benchmark (bench/long_context/synthetic_kv.py); the values
    are noise, so the request's tokens are meaningless afterwards."""

    request_id: str
    seed: int


class SyntheticKVFilled(msgspec.Struct, tag="synthetic_kv_filled", frozen=True):
    """A rank's answer to `FillSyntheticKV` (also what the in-process worker returns)."""

    rank: int
    group: int  # the rank's KVP group
    num_blocks: int  # blocks of the request in the rank's mirror, all filled
    num_bytes: int  # bytes written over every local layer, K and V
    mean_square: float  # mean of x^2 read back from those blocks: ~1 for N(0, 1), 0 if none


class Shutdown(msgspec.Struct, tag="shutdown", frozen=True):
    pass


class WorkerFailed(msgspec.Struct, tag="failed", frozen=True):
    rank: int
    error: str  # formatted traceback


DriverMessage = InitWorker | RunStep | FillSyntheticKV | Shutdown
WorkerMessage = WorkerHello | WorkerReady | StepDone | SyntheticKVFilled | WorkerFailed | Heartbeat
