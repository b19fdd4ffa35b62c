"""Executors run StepPlans: in this process (one device) or on worker processes (3D layouts)."""

from __future__ import annotations

from typing import Protocol

from mnemosyne.config import EngineConfig
from mnemosyne.wire.plan import StepPlan, StepResult


class Executor(Protocol):
    def submit(self, plan: StepPlan) -> None:
        """Start running `plan` (may return before it finishes)."""

    def get_result(self) -> StepResult:
        """The result of the oldest unfinished plan (blocks until it is done)."""
        ...

    def check_health(self) -> None:
        """Raise WorkerError if a worker failed, died or stopped beating (call while idle)."""

    @property
    def num_rejected_messages(self) -> int:
        """Control messages dropped (bad HMAC, garbage, wrong sender) since start."""
        ...

    def shutdown(self) -> None: ...


def make_executor(config: EngineConfig) -> Executor:
    if config.parallel.world_size == 1 and config.parallel.driver_address is None:
        from mnemosyne.executor.uniproc import UniProcExecutor

        return UniProcExecutor(config)
    from mnemosyne.executor.multiproc import MultiProcExecutor

    return MultiProcExecutor(config)
