"""The prefill lane, driver side: a long prompt prefills in large chunks beside the steps.

Mixed batching gives a long prompt what a step leaves: every step reads the weights for its
decodes, so within the TBT target a prompt late in its prefill gets 32-64 tokens a step and
prefills at about 1.9x its floor (8B, 256K tokens beside 32 decodes on an H200). With
`SchedulerConfig.prefill_lane` the prompt instead runs in a lane of its own::

    engine step()   lane: a chunk done? -> process it (update_from_output, lane_done)
                          near idle?    -> choose S -> schedule_lane() -> plan -> executor.submit_lane
                    steps: as before (decodes, short prompts, the owner's first and last chunks)
                    nothing in the steps but the lane in flight -> wait for it up to LANE_POLL_S

    device          steps   |== n ==|== n+1 ==|== n+2 ==|== n+3 ==|...  (S SMs: first(S))
                    lane    |======== chunk k ========|===== chunk k+1 ...  (the rest: rest(S))

The scheduler decides who is in the lane (engine/scheduler.py); the worker runs its chunks
and confines the steps beside each to the S SMs it leaves them (worker/prefill_lane.py).
Exactness is unchanged: the lane runs the same model on the same cache; only which kernels
and when differ.

S per chunk (`LaneSplitChooser`, engine/lane_split.py): the fewest SMs of the choices whose
predicted step of the running decodes fits LANE_DECODES_HEADROOM x the TBT target
(`BesideLaneLatencyModel.fewest_sms`), and on which the prompts the steps prefill meet their
TTFT deadlines. When none does but the whole device would, the lane *holds*: it launches
nothing (`LaneHold`, engine/lane_state.py). For a decode of a long context its owner and queue
go back to the steps (mixed batching on every SM, within the target) until a split fits again;
for a short prompt that would crawl beside the chunk, while the owner can spare the time, they
wait and the prompt has the steps. When not even the whole device would fit the decodes, the
most SMs.

When: a chunk launches once the lane's chunks in flight are predicted to end within the
launch lead, LANE_LAUNCH_LEAD_STEPS TBT targets + LANE_LAUNCH_LEAD_FRACTION of the newest
one's run (at most MAX_LANE_CHUNKS_IN_FLIGHT in flight), so the next chunk is queued just
before the lane would idle and its split and owner are chosen as late as that allows (a split
chosen when the chunk before it launched reacted to a short prompt's arrival up to two chunks,
~3 s, late). A chunk's run is predicted as its time alone x N / (N - S) x r, r a running mean
of its device time / that (prior LANE_CHUNK_RUN_SCALE); the runs in flight start at the later
of their submission and the previous chunk's processing (`drain_s`):

    lane    |==== chunk k ==========|==== chunk k+1 ====...
                               ^ launch k+1: drain_s() <= the lead

Measured on an H200 (8B mixed scenario, benchmarks/results/README.md, "Thirty-second
session"): the lane's 63 gaps between chunks summed to 56 ms, against 67 ms with two chunks
always in flight.

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
from dataclasses import dataclass
from typing import Protocol

from mnemosyne.engine.lane_split import LaneSplitChooser
from mnemosyne.engine.lane_state import LaneHold
from mnemosyne.engine.scheduler import Scheduler
from mnemosyne.engine.scheduler_output import SchedulerOutput
from mnemosyne.engine.step_log import StepLog
from mnemosyne.engine.step_plan import PlanBuilder
from mnemosyne.latency.beside_lane import SCALE_WEIGHT
from mnemosyne.latency.composition import StepComposition
from mnemosyne.outputs import RequestOutput
from mnemosyne.wire.plan import StepPlan, StepResult, StepTrace

LANE_POLL_S = 0.005  # how long step() waits for the lane when the steps have nothing to run
# A lane chunk's device time over its time alone x N / (N - S): 1.12-1.14 beside the 8B mixed
# scenario's decodes on 16 SMs (H200, benchmarks/results/README.md, "Thirty-first session" `d/`)
LANE_CHUNK_RUN_SCALE = 1.13
LANE_LAUNCH_LEAD_STEPS = 2.0  # a chunk launches this many TBT targets before the lane would idle ...
LANE_LAUNCH_LEAD_FRACTION = 0.05  # ... plus this fraction of the running chunk's predicted run


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
    with the SMs `split` chooses to leave the steps, take their results oldest first, hand
    them to the engine's output processing, log them; keep the steps' model's share of the
    SMs current and teach it from the steps beside the chunks."""

    def __init__(
        self,
        scheduler: Scheduler,
        planner: PlanBuilder,
        executor: LaneExecutor,
        process: Callable[[SchedulerOutput, StepResult], list[RequestOutput]],
        predict_s: Callable[[SchedulerOutput], float],
        step_log: StepLog | None,
        split: LaneSplitChooser,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`process`: the engine's output processing of a result; `predict_s`: the latency
        model's prediction of a chunk alone, its padding rows included
        (`beside_lane.lane_chunk_alone_s`); `split`: each chunk's split (its `beside` is the
        steps' model while a chunk runs); `clock`: now, in seconds."""
        self.scheduler = scheduler
        self.planner = planner
        self.executor = executor
        self.process = process
        self.predict_s = predict_s
        self.step_log = step_log
        self.split = split
        self.beside = split.beside
        self.clock = clock
        self.choices = executor.lane_steps_sms_choices  # empty on CPU: the steps keep every SM
        self.num_sms = executor.device_num_sms
        self._in_flight: deque[_LaneChunk] = deque()  # oldest first
        self._last_done = 0.0  # clock() when the latest chunk was processed
        self.run_scale = LANE_CHUNK_RUN_SCALE  # r (module docstring)
        self.num_chunks_by_steps_sms: Counter[int | None] = Counter()  # chunks launched, by the SMs they left

    def advance(self, timeout_s: float) -> list[RequestOutput]:
        """Process the chunks done within `timeout_s` (the oldest may take that long, the rest
        are polled), then launch as many as the scheduler gives, when it is time (module
        docstring)."""
        outputs: list[RequestOutput] = []
        while self._in_flight:
            result = self.executor.lane_result(timeout_s)
            if result is None:
                break
            chunk = self._in_flight.popleft()
            now = self.clock()
            measured_s = now - max(chunk.submitted, self._last_done)
            if self.step_log is not None:
                self.step_log.write_lane_chunk(
                    now, measured_s, chunk.predicted_s, chunk.sched, chunk.steps_sms, result.trace
                )
            self._learn_run(chunk, result, measured_s)
            self._last_done = now
            outputs += self.process(chunk.sched, result)
            self.scheduler.lane_done()
            timeout_s = 0.0
        if not self.choices:  # CPU: the chunks queue on the lane's thread, no split
            while (sched := self.scheduler.schedule_lane()) is not None:
                self._launch(sched, None)
        elif not self.scheduler.lane_full and self._time_to_launch():
            steps_sms = self._choose_split()
            if (sched := self.scheduler.schedule_lane()) is not None:
                self._launch(sched, steps_sms)
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
        return self._in_flight[0].steps_sms if self._in_flight else None

    def drain_s(self) -> float:
        """Predicted seconds until the chunks in flight are done (module docstring's runs)."""
        if not self._in_flight:
            return 0.0
        start = max(self._in_flight[0].submitted, self._last_done)
        return max(0.0, start + sum(c.run_s for c in self._in_flight) - self.clock())

    def _time_to_launch(self) -> bool:
        """No chunk in flight, or they end within the launch lead (module docstring)."""
        if not self._in_flight:
            return True
        lead_s = (
            LANE_LAUNCH_LEAD_STEPS * self.split.target_s
            + LANE_LAUNCH_LEAD_FRACTION * self._in_flight[-1].run_s
        )
        return self.drain_s() <= lead_s

    def _choose_split(self) -> int | None:
        """The next chunk's split; None while the lane holds (the split chooser's hold)."""
        choice: int | LaneHold = LaneHold.NONE
        if self.scheduler.claim_lane():
            owner = self.scheduler.lane_owner
            assert owner is not None
            choice = self.split.choose(
                self.scheduler.decode_load(), self.scheduler.steps_prompts(), owner, self.num_sms,
                self.choices, self.clock(), self.drain_s(),
            )  # fmt: skip
        self.scheduler.hold_lane(choice if isinstance(choice, LaneHold) else LaneHold.NONE)
        return None if isinstance(choice, LaneHold) else choice

    def _launch(self, sched: SchedulerOutput, steps_sms: int | None) -> None:
        predicted_s = self.predict_s(sched)
        run_s = self._on_lane_s(predicted_s, steps_sms) * self.run_scale
        self._in_flight.append(_LaneChunk(sched, self.clock(), predicted_s, steps_sms, run_s))
        self.num_chunks_by_steps_sms[steps_sms] += 1
        self.executor.submit_lane(self.planner.build(sched), steps_sms)

    def _learn_run(self, chunk: _LaneChunk, result: StepResult, measured_s: float) -> None:
        """r from a chunk done: its device time where the worker timed it, else `measured_s`."""
        if chunk.steps_sms is None or chunk.predicted_s <= 0:
            return
        timing = result.trace.lane if result.trace is not None else None
        run_s = timing.device_s if timing is not None and timing.device_s > 0 else measured_s
        ratio = run_s / self._on_lane_s(chunk.predicted_s, chunk.steps_sms)
        self.run_scale += SCALE_WEIGHT * (ratio - self.run_scale)

    def _on_lane_s(self, alone_s: float, steps_sms: int | None) -> float:
        """A chunk's time alone on every SM, scaled to the SMs its split leaves the lane (N / (N - S))."""
        return alone_s if steps_sms is None else alone_s * self.num_sms / (self.num_sms - steps_sms)

    def _update_share(self) -> None:
        """The steps' share of the SMs from now on: the running chunk's."""
        steps_sms = self.steps_sms
        self.beside.steps_share = None if steps_sms is None else steps_sms / self.num_sms


@dataclass(frozen=True)
class _LaneChunk:
    sched: SchedulerOutput
    submitted: float  # clock()
    predicted_s: float  # alone on every SM (`predict_s`)
    steps_sms: int | None  # the SMs it leaves the steps
    run_s: float  # its predicted run on the lane (module docstring)
