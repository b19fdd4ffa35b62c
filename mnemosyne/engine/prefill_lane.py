"""The prefill lane, driver side: a long prompt prefills in large chunks beside the steps.

Mixed batching gives a long prompt what a step leaves: every step reads the weights for its
decodes, so within the TBT target a prompt late in its prefill gets 32-64 tokens a step and
prefills at about 1.9x its floor (8B, 256K tokens beside 32 decodes on an H200). With
`SchedulerConfig.prefill_lane` the prompt instead runs in a lane of its own::

    engine step()   lane: a chunk done? -> process it (update_from_output, lane_done)
                          idle?         -> schedule_lane() -> plan -> executor.submit_lane
                    steps: as before (decodes, short prompts, the owner's first and last chunks)
                    nothing in the steps but the lane busy -> wait for the lane up to LANE_POLL_S

    device          steps   |== n ==|== n+1 ==|== n+2 ==|== n+3 ==|...  (worker's stream, all SMs)
                    lane    |======== chunk k ========|===== chunk k+1 ...  (green context)

The scheduler decides who is in the lane (engine/scheduler.py); the worker runs its chunks
(worker/prefill_lane.py). Exactness is unchanged: the lane runs the same model on the same
cache; only which kernels and when differ.

While the lane runs, the steps share the GPU and take longer than the latency model says
(32 decodes of 1.5K keys: 6.4 ms alone, 20.7 ms beside the lane on an H200). Adaptive
chunking sizes them by `BesideLaneLatencyModel`: the model's prediction times the measured
ratio of such steps (a running mean), and online calibration does not learn from them.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from mnemosyne.engine.scheduler import Scheduler
from mnemosyne.engine.scheduler_output import SchedulerOutput
from mnemosyne.engine.step_log import StepLog
from mnemosyne.engine.step_plan import PlanBuilder
from mnemosyne.latency.composition import StepComposition
from mnemosyne.latency.model import LatencyModel
from mnemosyne.outputs import RequestOutput
from mnemosyne.wire.plan import StepResult

if TYPE_CHECKING:
    from mnemosyne.executor.uniproc import UniProcExecutor

LANE_POLL_S = 0.005  # how long step() waits for the lane when the steps have nothing to run
# The steps' slowdown beside the lane before any is measured: the 8B mixed scenario's decode
# steps beside 4096-token chunks (16 SMs free) ran at a median 3.1x their prediction on an H200
# (benchmarks/results/README.md, "Twenty-third session": step_time_ratio_p50 0.32)
PRIOR_BESIDE_LANE_FACTOR = 3.0
FACTOR_WEIGHT = 0.1  # the running mean's weight of each new step


class BesideLaneLatencyModel:
    """`inner`'s prediction; `base`'s times `factor` while the lane runs (`active`).

    `factor` follows measured / `base`-predicted seconds of the steps that ran beside the
    lane (`observe`); `base` is the model before online calibration, which learns only from
    steps with the GPU to themselves."""

    def __init__(self, inner: LatencyModel, base: LatencyModel) -> None:
        self.inner = inner
        self.base = base
        self.layout = inner.layout
        self.active = False  # the lane has chunks in flight (set by the engine each step)
        self.factor = PRIOR_BESIDE_LANE_FACTOR

    def step_time_s(self, composition: StepComposition) -> float:
        if self.active:
            return self.factor * self.base.step_time_s(composition)
        return self.inner.step_time_s(composition)

    def observe(self, predicted_s: float, measured_s: float) -> None:
        """A step that ran beside the lane: `base` predicted `predicted_s`, it took `measured_s`."""
        if predicted_s > 0 and measured_s > 0:
            self.factor += FACTOR_WEIGHT * (measured_s / predicted_s - self.factor)


class LaneDriver:
    """The engine's side of the lane: launch the chunks `Scheduler.schedule_lane` gives, take
    their results oldest first, hand them to the engine's output processing, log them."""

    def __init__(
        self,
        scheduler: Scheduler,
        planner: PlanBuilder,
        executor: UniProcExecutor,
        process: Callable[[SchedulerOutput, StepResult], list[RequestOutput]],
        predict_s: Callable[[SchedulerOutput], float],
        step_log: StepLog | None,
    ) -> None:
        """`process`: the engine's output processing of a result; `predict_s`: the latency
        model's prediction of a chunk alone (for the step log)."""
        self.scheduler = scheduler
        self.planner = planner
        self.executor = executor
        self.process = process
        self.predict_s = predict_s
        self.step_log = step_log
        # the chunks in flight, oldest first: (chunk, submitted at time.monotonic(), predicted_s)
        self._in_flight: deque[tuple[SchedulerOutput, float, float]] = deque()
        self._last_done = 0.0  # time.monotonic() when the latest chunk was processed

    def advance(self, timeout_s: float) -> list[RequestOutput]:
        """Process the chunks done within `timeout_s` (the oldest may take that long, the rest
        are polled), then launch as many as the scheduler gives."""
        outputs: list[RequestOutput] = []
        while self._in_flight:
            result = self.executor.lane_result(timeout_s)
            if result is None:
                break
            sched, submitted, predicted_s = self._in_flight.popleft()
            now = time.monotonic()
            if self.step_log is not None:
                self.step_log.write_lane_chunk(now, now - max(submitted, self._last_done), predicted_s, sched)
            self._last_done = now
            outputs += self.process(sched, result)
            self.scheduler.lane_done()
            timeout_s = 0.0
        while (sched := self.scheduler.schedule_lane()) is not None:
            self._in_flight.append((sched, time.monotonic(), self.predict_s(sched)))
            self.executor.submit_lane(self.planner.build(sched))
        return outputs

    def drain(self) -> None:
        """Wait for every chunk in flight; their results are stale (the engine has no request)."""
        while self._in_flight:
            self.executor.lane_result(None)
            self._in_flight.popleft()
            self.scheduler.lane_done()
