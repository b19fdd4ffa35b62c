"""Run plans in this process, on one device (every process group has size 1).

`submit` launches a plan's device work and returns; `get_result` waits for the oldest
plan's sampled ids only then (worker/pending_result.py), so with async scheduling the
engine schedules and launches step n+1 while the device still runs step n. One exception::

    submit(n + 1)   step n + 1 launches eagerly and step n, in flight, is decode-only
                    (`Worker.reports_previous_first`): keep it
    get_result()    step n's ids, as always (the kept step is not launched yet)
    next submit or get_result: launch the kept step first, then as above

Launched at once, an eager step holds this thread for about as long as the device runs it
(7.6-25 ms on an H200), so the engine would read step n's tokens only after all of it:
the decodes' time between tokens grows by the launch (15-21 ms decode steps in the 1B
serving trace). Kept, the engine returns step n's tokens first; the prefill step starts a
little later (step n's last device time plus the engine's output processing and next
scheduling: a few ms). After a step with chunks, nothing is kept (a prefill's launch
overlaps the device time of the step before it).
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future

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
        self._kept: StepPlan | None = None  # submitted, launched at the next call (see above)
        self._lane: deque[Future[StepResult]] = deque()  # the prefill lane's chunks in flight

    def submit(self, plan: StepPlan) -> None:
        self._launch_kept()
        if self._results and self.worker.reports_previous_first(plan):
            self._kept = plan
        else:
            self._launch(plan)

    def get_result(self) -> StepResult:
        if not self._results:  # only a kept plan in flight
            self._launch_kept()
        return self._results.popleft().wait()

    @property
    def device_num_sms(self) -> int:
        """The device's SMs (0 on CPU)."""
        device = self.worker.device
        return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0

    @property
    def lane_steps_sms_choices(self) -> tuple[int, ...]:
        """The SM counts a prefill lane chunk may leave the steps; empty without a split (CPU)."""
        lane = self.worker.lane
        return lane.steps_sms_choices if lane is not None else ()

    def submit_lane(self, plan: StepPlan, steps_sms: int | None) -> None:
        """Launch a prefill lane chunk (worker/prefill_lane.py) after those in flight, leaving
        the steps `steps_sms` SMs (one of `lane_steps_sms_choices`; None without). A kept plan
        is launched first: it was built before `plan`, whose block-table deltas follow it."""
        self._launch_kept()
        self._lane.append(self.worker.execute_lane_async(plan, steps_sms))

    def lane_result(self, timeout_s: float | None) -> StepResult | None:
        """The oldest lane chunk's result once its kernels are done; None while it still runs
        after `timeout_s` (0: a poll; None: wait)."""
        if not self._lane:
            raise RuntimeError("no prefill lane chunk in flight")
        try:
            result = self._lane[0].result(timeout=timeout_s)
        except TimeoutError:
            return None
        self._lane.popleft()
        return result

    def _launch(self, plan: StepPlan) -> None:
        pending = self.worker.execute_async(plan)
        assert pending is not None  # the single rank is the reporting rank
        self._results.append(pending)

    def _launch_kept(self) -> None:
        if self._kept is not None:
            plan, self._kept = self._kept, None
            self._launch(plan)

    def fill_synthetic_kv(self, request_id: str, seed: int) -> list[SyntheticKVFilled]:
        """BENCHMARK-ONLY: N(0, 1) K/V into the request's blocks (worker/synthetic_kv.py), on
        the device's stream after every plan submitted so far; done when it returns."""
        self._launch_kept()
        return [self.worker.fill_synthetic_kv(request_id, seed)]

    num_rejected_messages = 0  # no control port

    def check_health(self) -> None:
        pass  # the device runs in this process

    def shutdown(self) -> None:
        for chunk in self._lane:
            chunk.exception()  # its kernels write the cache: let them end first
        self._lane.clear()
        self._results.clear()
        self._kept = None
        self.worker.shutdown()
