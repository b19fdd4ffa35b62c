"""The prefill lane, driver side: a long prompt prefills in large chunks beside the steps.

Mixed batching gives a long prompt what a step leaves: every step reads the weights for its
decodes, so within the TBT target a prompt late in its prefill gets 32-64 tokens a step and
prefills at about 1.9x its floor (8B, 256K tokens beside 32 decodes on an H200). With
`SchedulerConfig.prefill_lane` the prompt instead runs in a lane of its own::

    engine step()   lane: a chunk done? -> process it (update_from_output, lane_done)
                          idle?         -> schedule_lane() -> plan; choose S -> executor.submit_lane
                    steps: as before (decodes, short prompts, the owner's first and last chunks)
                    nothing in the steps but the lane in flight -> wait for it up to LANE_POLL_S

    device          steps   |== n ==|== n+1 ==|== n+2 ==|== n+3 ==|...  (S SMs: first(S))
                    lane    |======== chunk k ========|===== chunk k+1 ...  (the rest: rest(S))

The scheduler decides who is in the lane (engine/scheduler.py); the worker runs its chunks
and confines the steps beside each to the S SMs it leaves them (worker/prefill_lane.py).
Exactness is unchanged: the lane runs the same model on the same cache; only which kernels
and when differ.

S per chunk (`BesideLaneLatencyModel.fewest_sms`): the fewest SMs of the choices whose
predicted step of the running decodes fits LANE_DECODES_HEADROOM x the TBT target. When none
does but the whole device would (a decode of a long context), the lane *holds*: it launches
nothing, and its owner and queue go back to the steps (mixed batching on every SM, within the
target) until a split fits again. When not even the whole device would, the most SMs.
The steps' time on S SMs is `latency/beside_lane.py`'s model: the chunks' compute scaled by
N/S, the decodes' weight reads and K/V reads each at its own measured rate per confined SM,
times m, learned from the decode-only steps beside the lane.

Measured on an H200 (8B mixed scenario, benchmarks/results/README.md, "Twenty-fourth
session"): the splits moved from 16 to 24 SMs at ~15 s and to 32 at ~45 s of the prompt's
51 s, each 10-s window's steps within a p99 of 28.4 ms (always 16 SMs: p50 33.7 ms in the last
10 s). Adaptive chunking sizes the steps by that model while a chunk runs; online calibration
learns only from steps with the GPU to themselves.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Protocol

from mnemosyne.engine.scheduler import Scheduler
from mnemosyne.engine.scheduler_output import SchedulerOutput
from mnemosyne.engine.step_log import StepLog
from mnemosyne.engine.step_plan import PlanBuilder
from mnemosyne.latency.beside_lane import BesideLaneLatencyModel
from mnemosyne.latency.composition import StepComposition
from mnemosyne.outputs import RequestOutput
from mnemosyne.wire.plan import StepPlan, StepResult, StepTrace

LANE_POLL_S = 0.005  # how long step() waits for the lane when the steps have nothing to run


class LaneExecutor(Protocol):
    """What runs the lane's chunks: `UniProcExecutor` on a device, `simulator/lane.py`'s
    `VirtualLane` on the simulator's clock."""

    @property
    def lane_steps_sms_choices(self) -> tuple[int, ...]: ...  # empty: the steps keep every SM

    @property
    def device_num_sms(self) -> int: ...

    def submit_lane(self, plan: StepPlan, steps_sms: int | None) -> None: ...

    def lane_result(self, timeout_s: float | None) -> StepResult | None: ...


class LaneDriver:
    """The engine's side of the lane: launch the chunks `Scheduler.schedule_lane` gives, each
    with the SMs it leaves the steps, take their results oldest first, hand them to the
    engine's output processing, log them; keep `beside`'s share of the SMs current and teach
    it from the steps beside the chunks."""

    def __init__(
        self,
        scheduler: Scheduler,
        planner: PlanBuilder,
        executor: LaneExecutor,
        process: Callable[[SchedulerOutput, StepResult], list[RequestOutput]],
        predict_s: Callable[[SchedulerOutput], float],
        step_log: StepLog | None,
        beside: BesideLaneLatencyModel,
        target_s: float,
    ) -> None:
        """`process`: the engine's output processing of a result; `predict_s`: the latency
        model's prediction of a chunk alone, its padding rows included (for the step log,
        `beside_lane.lane_chunk_alone_s`); `beside`: the steps' model
        while a chunk runs; `target_s`: the TBT target the steps beside a chunk must fit."""
        self.scheduler = scheduler
        self.planner = planner
        self.executor = executor
        self.process = process
        self.predict_s = predict_s
        self.step_log = step_log
        self.beside = beside
        self.target_s = target_s
        self.choices = executor.lane_steps_sms_choices  # empty on CPU: the steps keep every SM
        self.num_sms = executor.device_num_sms
        # the chunks in flight, oldest first: (chunk, submitted at time.monotonic(), predicted_s, steps_sms)
        self._in_flight: deque[tuple[SchedulerOutput, float, float, int | None]] = deque()
        self._last_done = 0.0  # time.monotonic() when the latest chunk was processed
        self.num_chunks_by_steps_sms: Counter[int | None] = Counter()  # chunks launched, by the SMs they left

    def advance(self, timeout_s: float) -> list[RequestOutput]:
        """Process the chunks done within `timeout_s` (the oldest may take that long, the rest
        are polled), then launch as many as the scheduler gives."""
        outputs: list[RequestOutput] = []
        while self._in_flight:
            result = self.executor.lane_result(timeout_s)
            if result is None:
                break
            sched, submitted, predicted_s, steps_sms = self._in_flight.popleft()
            now = time.monotonic()
            if self.step_log is not None:
                measured_s = now - max(submitted, self._last_done)
                self.step_log.write_lane_chunk(now, measured_s, predicted_s, sched, steps_sms, result.trace)
            self._last_done = now
            outputs += self.process(sched, result)
            self.scheduler.lane_done()
            timeout_s = 0.0
        steps_sms = None  # the next chunk's S (`fewest_sms`); asked only when a chunk may launch
        if self.choices and not self.scheduler.lane_full:
            has_owner = self.scheduler.claim_lane()
            if has_owner:
                decodes = self.scheduler.decode_load()
                steps_sms = self.beside.fewest_sms(decodes, self.num_sms, self.choices, self.target_s)
            self.scheduler.hold_lane(has_owner and steps_sms is None)
        while (sched := self.scheduler.schedule_lane()) is not None:
            self.num_chunks_by_steps_sms[steps_sms] += 1
            self._in_flight.append((sched, time.monotonic(), self.predict_s(sched), steps_sms))
            self.executor.submit_lane(self.planner.build(sched), steps_sms)
        self._update_share()
        return outputs

    def observe_step(self, composition: StepComposition, trace: StepTrace | None, measured_s: float) -> None:
        """A step processed while lane chunks were in flight took `measured_s`."""
        if trace is not None and trace.steps_sms is not None:
            self.beside.observe(composition, trace.steps_sms / self.num_sms, measured_s)

    def drain(self) -> None:
        """Wait for every chunk in flight; their results are stale (the engine has no request)."""
        while self._in_flight:
            self.executor.lane_result(None)
            self._in_flight.popleft()
            self.scheduler.lane_done()
        self._update_share()

    @property
    def steps_sms(self) -> int | None:
        """The SMs the running chunk (the oldest in flight) leaves the steps; None: every SM."""
        return self._in_flight[0][3] if self._in_flight else None

    def _update_share(self) -> None:
        """The steps' share of the SMs from now on: the running chunk's."""
        steps_sms = self.steps_sms
        self.beside.steps_share = None if steps_sms is None else steps_sms / self.num_sms
