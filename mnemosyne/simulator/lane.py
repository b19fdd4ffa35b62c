"""The prefill lane on the simulator's clock: the engine's own `LaneDriver` (choice of split,
chunks in flight, output processing) against `VirtualLane`, a lane executor whose chunks take
modelled time instead of running.

    a chunk of c tokens after P keys, submitted at t, leaving the steps S of N SMs:
        work   = alone x N / (N - S) x LANE_CHUNK_IDLE       (seconds with the steps idle)
        alone  = the latency model's time of the chunk by itself on the whole device, its
                 padding rows included (`beside_lane.lane_chunk_alone_s`, as the engine's
                 step log times it)
        start  = max(t, the previous chunk's end)           (one lane: chunks run in order)
        end    = when the work is done: it progresses 1 s a second while no step runs, and
                 LANE_CHUNK_IDLE / LANE_CHUNK_BUSY s a second while one does (`note_step`)

    lane    |=== chunk k ========|=== chunk k+1 =====...
    steps      |s|s|s|   |s|s|       (each step beside it slows it; an idle gap does not)

A chunk's end moves later while steps are noted that overlap it, so it is known for good
only once the clock has passed it: `next_end_s` is the end given the steps noted so far
(the engine notes each step as it submits it, before the clock reaches it).

The steps beside a chunk take `BesideLaneLatencyModel.confined_s` (on S SMs), the engine's own
prediction of them (`engine.py`). Not modelled: the lane's wait for the steps launched before
each chunk, and the steps' host time.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from mnemosyne.latency.beside_lane import lane_chunk_alone_s
from mnemosyne.latency.composition import GroupLoad, StepComposition
from mnemosyne.latency.model import LatencyModel
from mnemosyne.wire.plan import StepPlan, StepResult

# A lane chunk's time over its SM share's alone (N / (N - S)), measured on an H200 (8B,
# 4096-token chunks; benchmarks/results/README.md, "Twenty-sixth session"): with no step
# beside, 1.03-1.07 (the lane's own path; the 8B serving trace's chunks with the steps idle:
# 1.17 / 1.22x their alone-prediction on 116 SMs); with steps beside it, 1.17-1.24 (their
# weight and K/V reads share the memory system: 1.28-1.38x on 116 SMs, 1.48-1.52x on 108,
# with one decode or 32 alike).
LANE_CHUNK_IDLE = 1.06
LANE_CHUNK_BUSY = 1.21


@dataclass
class _Chunk:
    submit_s: float
    work_s: float  # at the idle rate
    steps_sms: int


class VirtualLane:
    """`engine/prefill_lane.py`'s `LaneExecutor` on a virtual clock (`clock()`: now, in s)."""

    def __init__(
        self,
        model: LatencyModel,
        num_sms: int,
        steps_sms_choices: tuple[int, ...],
        clock: Callable[[], float],
        chunk_tokens: int = 0,
    ) -> None:
        """`chunk_tokens`: the rows every lane chunk runs with (a shorter one is padded)."""
        if not steps_sms_choices or max(steps_sms_choices) >= num_sms:
            raise ValueError(f"lane splits {steps_sms_choices} need fewer SMs than the device's {num_sms}")
        self.model = model
        self.clock = clock
        self._choices = steps_sms_choices
        self._chunk_tokens = chunk_tokens
        self._num_sms = num_sms
        self._chunks: deque[_Chunk] = deque()  # in flight, oldest first
        self._origin_s = 0.0  # when the latest chunk done ended (the next cannot start before)
        self._steps: list[tuple[float, float]] = []  # the steps noted since then: (start, end), in order
        self.spans_s: list[tuple[float, float, int]] = []  # (start, end, steps_sms) of every chunk done

    @property
    def lane_steps_sms_choices(self) -> tuple[int, ...]:
        return self._choices

    @property
    def device_num_sms(self) -> int:
        return self._num_sms

    @property
    def next_end_s(self) -> float | None:
        """When the oldest chunk in flight ends, given the steps noted so far; None with none."""
        spans = self._spans()
        return spans[0][1] if spans else None

    def work_s(self, plan: StepPlan, steps_sms: int) -> float:
        """The chunk's time with no step beside it."""
        load = GroupLoad()
        for chunk in plan.chunks:
            load = load.plus_chunk(chunk.num_tokens, chunk.start)
        alone_s = lane_chunk_alone_s(self.model, StepComposition.single(load), self._chunk_tokens)
        return alone_s * self._num_sms / (self._num_sms - steps_sms) * LANE_CHUNK_IDLE

    def note_step(self, start_s: float, end_s: float) -> None:
        """A step runs on the device over [start_s, end_s) (steps are noted in order)."""
        if self._chunks and end_s > start_s:
            self._steps.append((start_s, end_s))

    def submit_lane(self, plan: StepPlan, steps_sms: int | None) -> None:
        assert steps_sms is not None  # the driver picks one of the choices
        self._chunks.append(_Chunk(self.clock(), self.work_s(plan, steps_sms), steps_sms))

    def lane_result(self, timeout_s: float | None) -> StepResult | None:
        """The oldest chunk's (empty) result once the clock has reached its end; None before
        (the simulator moves the clock, never this)."""
        if not self._chunks:
            raise RuntimeError("no prefill lane chunk in flight")
        start_s, end_s = self._spans()[0]
        if end_s > self.clock():
            return None
        self.spans_s.append((start_s, end_s, self._chunks.popleft().steps_sms))
        self._origin_s = end_s
        self._steps = [s for s in self._steps if s[1] > end_s] if self._chunks else []
        return StepResult(0)

    def _spans(self) -> list[tuple[float, float]]:
        """(start, end) of each chunk in flight: their work, in order, over the noted steps."""
        slow = LANE_CHUNK_BUSY / LANE_CHUNK_IDLE  # seconds per idle-rate second while a step runs
        spans, t, k = [], self._origin_s, 0
        for chunk in self._chunks:
            t = max(t, chunk.submit_s)
            start_s, work = t, chunk.work_s
            while k < len(self._steps) and self._steps[k][1] <= t:
                k += 1
            while work > 0:
                if k == len(self._steps):  # no more steps: the rest at the idle rate
                    t += work
                    break
                a, b = self._steps[k]
                if t < a:  # idle until the next step
                    if work <= a - t:
                        t += work
                        break
                    work -= a - t
                    t = a
                if work * slow <= b - t:  # ends inside this step
                    t += work * slow
                    break
                work -= (b - t) / slow
                t = b
                k += 1
            spans.append((start_s, t))
        return spans
