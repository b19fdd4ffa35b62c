"""Run plans in this process, on one device (every process group has size 1)."""

from __future__ import annotations

from collections import deque

import torch

from mnemosyne.config import EngineConfig
from mnemosyne.parallel.groups import ProcessGroups
from mnemosyne.wire.plan import StepPlan, StepResult
from mnemosyne.worker.worker import Worker


class UniProcExecutor:
    def __init__(self, config: EngineConfig) -> None:
        self.worker = Worker(config, ProcessGroups.single(), torch.device(config.device))
        self._results: deque[StepResult] = deque()

    def submit(self, plan: StepPlan) -> None:
        result = self.worker.execute(plan)
        assert result is not None  # the single rank is the reporting rank
        self._results.append(result)

    def get_result(self) -> StepResult:
        return self._results.popleft()

    num_rejected_messages = 0  # no control port

    def check_health(self) -> None:
        pass  # the device runs in this process

    def shutdown(self) -> None:
        self._results.clear()
        self.worker.shutdown()
