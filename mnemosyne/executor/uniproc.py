"""Run plans in this process, on one device (every process group has size 1).

`submit` launches a plan's device work and returns; `get_result` waits for the oldest
plan's sampled ids only then (worker/pending_result.py), so with async scheduling the
engine schedules and launches step n+1 while the device still runs step n.
"""

from __future__ import annotations

from collections import deque

import torch

from mnemosyne.config import EngineConfig
from mnemosyne.parallel.groups import ProcessGroups
from mnemosyne.parallel.messages import SyntheticKVFilled
from mnemosyne.wire.plan import StepPlan, StepResult
from mnemosyne.worker.pending_result import PendingResult
from mnemosyne.worker.worker import Worker


class UniProcExecutor:
    def __init__(self, config: EngineConfig) -> None:
        self.worker = Worker(config, ProcessGroups.single(), torch.device(config.device))
        self._results: deque[PendingResult] = deque()

    def submit(self, plan: StepPlan) -> None:
        pending = self.worker.execute_async(plan)
        assert pending is not None  # the single rank is the reporting rank
        self._results.append(pending)

    def get_result(self) -> StepResult:
        return self._results.popleft().wait()

    def fill_synthetic_kv(self, request_id: str, seed: int) -> list[SyntheticKVFilled]:
        """BENCHMARK-ONLY: N(0, 1) K/V into the request's blocks (worker/synthetic_kv.py), on
        the device's stream after every plan submitted so far; done when it returns."""
        return [self.worker.fill_synthetic_kv(request_id, seed)]

    num_rejected_messages = 0  # no control port

    def check_health(self) -> None:
        pass  # the device runs in this process

    def shutdown(self) -> None:
        self._results.clear()
        self.worker.shutdown()
