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
predicted step of the running decodes fits LANE_STEP_HEADROOM x the TBT target. When none
does but the whole device would (a decode of a long context), the lane *holds*: it launches
nothing, and its owner and queue go back to the steps (mixed batching on every SM, within the
target) until a split fits again. When not even the whole device would, the most SMs. On S of the device's N SMs a step's time is modelled as::

    D = base(the step's decodes alone)   SM-bound there: D * max(1, N / (S * e))
    C = base(the step) - D               the chunks' compute: C * N / S
    e: how much more a confined SM moves than an average SM of the whole device (which waits
       on memory); learned from the decode-only steps beside the lane (a running mean)

Measured on an H200 (8B, benchmarks/results/README.md, "Twenty-second session"): 32 decodes
of 1.5K keys take 6.5 ms on 132 SMs and 22.0 / 16.1 / 12.5 ms on 16 / 24 / 32 (e = 2.4 /
2.2 / 2.1), 64 of 4K keys 13.1 ms and 64.9 / 45.7 / 34.2 / 25.1 ms on 16 / 24 / 32 / 48
(e = 1.7 / 1.6 / 1.6 / 1.4); beside a chunk 10-15% more. In the engine (the 8B mixed
scenario, "Twenty-fourth session") e settled at 1.79, and the splits moved from 16 to 24 SMs
at ~15 s and to 32 at ~45 s of the prompt's 51 s, each 10-s window's steps within a p99 of
28.4 ms (always 16 SMs: p50 33.7 ms in the last 10 s). Adaptive chunking sizes the steps by
this model while a chunk runs; online calibration learns only from steps with the GPU to
themselves.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import Protocol

from mnemosyne.engine.scheduler import Scheduler
from mnemosyne.engine.scheduler_output import SchedulerOutput
from mnemosyne.engine.step_log import StepLog
from mnemosyne.engine.step_plan import PlanBuilder
from mnemosyne.latency.composition import GroupLoad, StepComposition
from mnemosyne.latency.model import LatencyModel
from mnemosyne.outputs import RequestOutput
from mnemosyne.wire.plan import StepPlan, StepResult, StepTrace

LANE_POLL_S = 0.005  # how long step() waits for the lane when the steps have nothing to run
LANE_STEP_HEADROOM = 0.9  # a lane chunk leaves the steps SMs for this fraction of the TBT target
# e before any step is measured: 32 decodes of 1.5K keys on 16 SMs beside a chunk (the 8B
# mixed scenario's start), 22.0 ms x 1.12 against 6.5 ms on all 132 SMs (see above)
PRIOR_SM_EFFICIENCY = 2.1
EFFICIENCY_WEIGHT = 0.1  # the running mean's weight of each new step


def decodes_only(composition: StepComposition) -> StepComposition:
    """The decodes of a (one-group) step without its chunks."""
    (g,) = composition.groups
    return StepComposition.single(
        GroupLoad(
            num_tokens=g.num_decodes,
            num_decodes=g.num_decodes,
            decode_kv_tokens=g.decode_kv_tokens,
            max_decode_kv_tokens=g.max_decode_kv_tokens,
            num_sampled=min(g.num_sampled, g.num_decodes),
        )
    )


class BesideLaneLatencyModel:
    """`inner`'s prediction while the steps have every SM; beside a lane chunk, on a share of
    them (`steps_share` = S / N, set by the driver), `base`'s scaled as the module docstring
    draws. `base` is the model before online calibration, which learns only from steps with
    the GPU to themselves."""

    def __init__(self, inner: LatencyModel, base: LatencyModel) -> None:
        self.inner = inner
        self.base = base
        self.layout = inner.layout
        self.steps_share: float | None = None  # the steps' share of the SMs now; None: all of them
        self.efficiency = PRIOR_SM_EFFICIENCY  # e

    def step_time_s(self, composition: StepComposition) -> float:
        if self.steps_share is None:
            return self.inner.step_time_s(composition)
        return self.confined_s(composition, self.steps_share)

    def confined_s(self, composition: StepComposition, steps_share: float) -> float:
        """Predicted seconds of a step on `steps_share` of the SMs beside a lane chunk."""
        whole_s = self.base.step_time_s(composition)
        decodes_s = self.base.step_time_s(decodes_only(composition)) if composition.groups[0].num_chunks else whole_s
        chunks_s = max(0.0, whole_s - decodes_s)
        return decodes_s * max(1.0, 1.0 / (steps_share * self.efficiency)) + chunks_s / steps_share

    def observe(self, composition: StepComposition, steps_share: float, measured_s: float) -> None:
        """A step that ran on `steps_share` of the SMs beside a lane chunk took `measured_s`;
        decode-only steps teach e (others hold chunks whose own scaling is assumed)."""
        g = composition.groups[0]
        if g.num_chunks or not g.num_decodes or measured_s <= 0:
            return
        decodes_s = self.base.step_time_s(composition)
        seen = decodes_s / (steps_share * measured_s)  # e, were the step SM-bound
        if seen * steps_share < 1.0:  # slower than on the whole device: SM-bound
            self.efficiency += EFFICIENCY_WEIGHT * (seen - self.efficiency)

    def fewest_sms(
        self, decodes: StepComposition, num_sms: int, choices: Sequence[int], target_s: float
    ) -> int | None:
        """The fewest SMs of `choices` on which a step of `decodes` is predicted to fit
        LANE_STEP_HEADROOM x `target_s`. None when none does but every SM would: the lane
        holds (the decodes need the whole device: one of 351K keys took 54 ms on 32 SMs
        beside a chunk, 16 ms alone). The most of them when not even every SM would fit; the
        fewest with no decode."""
        if not decodes.groups[0].num_decodes:  # no token gap to keep
            return min(choices)
        bound_s = LANE_STEP_HEADROOM * target_s
        for steps_sms in sorted(choices):
            if self.confined_s(decodes, steps_sms / num_sms) <= bound_s:
                return steps_sms
        return None if self.base.step_time_s(decodes) <= bound_s else max(choices)


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
        model's prediction of a chunk alone (for the step log); `beside`: the steps' model
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
                self.step_log.write_lane_chunk(now, measured_s, predicted_s, sched, steps_sms)
            self._last_done = now
            outputs += self.process(sched, result)
            self.scheduler.lane_done()
            timeout_s = 0.0
        steps_sms = None  # the next chunk's S (`fewest_sms`); asked only when a chunk may launch
        if self.choices and not self.scheduler.lane_full:
            steps_sms = self.beside.fewest_sms(self.scheduler.decode_load(), self.num_sms, self.choices, self.target_s)
            self.scheduler.hold_lane(steps_sms is None)
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
