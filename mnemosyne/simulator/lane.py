"""The prefill lane on the simulator's clock: the engine's own `LaneDriver` (choice of split,
chunks in flight, output processing) against `VirtualLane`, a lane executor whose chunks take
modelled time instead of running.

    a chunk of c tokens after P keys, submitted at t, leaving the steps S of N SMs:
        start  = max(t, the previous chunk's end)          (one lane: chunks run in order)
        end    = start + alone x N / (N - S) x LANE_CHUNK_OVERHEAD
        alone  = the latency model's time of the chunk by itself on the whole device
    its result is there once the clock reaches its end

The steps beside a chunk take `BesideLaneLatencyModel.confined_s` (the decodes on S SMs), the
engine's own prediction of them (`engine.py`). Not modelled: the lane's wait for the steps
launched before each chunk, and the steps' host time.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from mnemosyne.latency.composition import GroupLoad, StepComposition
from mnemosyne.latency.model import LatencyModel
from mnemosyne.wire.plan import StepPlan, StepResult

# A lane chunk's time over its SM share's alone: on an H200 (8B, 4096-token chunks after up
# to 256K keys beside 32 decodes) the chunks took 1.34x their alone-prediction with 116 SMs and
# 1.46x mostly with 108 (1.14x and 1.22x from the SMs alone): 1.18 and 1.20 past the SMs
# (benchmarks/results/README.md, "Twenty-fourth session", d/ and c/)
LANE_CHUNK_OVERHEAD = 1.19


class VirtualLane:
    """`engine/prefill_lane.py`'s `LaneExecutor` on a virtual clock (`clock()`: now, in s)."""

    def __init__(
        self, model: LatencyModel, num_sms: int, steps_sms_choices: tuple[int, ...], clock: Callable[[], float]
    ) -> None:
        if not steps_sms_choices or max(steps_sms_choices) >= num_sms:
            raise ValueError(f"lane splits {steps_sms_choices} need fewer SMs than the device's {num_sms}")
        self.model = model
        self.clock = clock
        self._choices = steps_sms_choices
        self._num_sms = num_sms
        self._ends_s: deque[float] = deque()  # the chunks in flight, oldest first
        self._free_at_s = 0.0  # when the lane's latest chunk ends
        self.spans_s: list[tuple[float, float, int]] = []  # (start, end, steps_sms) of every chunk so far

    @property
    def lane_steps_sms_choices(self) -> tuple[int, ...]:
        return self._choices

    @property
    def device_num_sms(self) -> int:
        return self._num_sms

    @property
    def next_end_s(self) -> float | None:
        """When the oldest chunk in flight ends; None with none."""
        return self._ends_s[0] if self._ends_s else None

    def chunk_s(self, plan: StepPlan, steps_sms: int) -> float:
        load = GroupLoad()
        for chunk in plan.chunks:
            load = load.plus_chunk(chunk.num_tokens, chunk.start)
        alone_s = self.model.step_time_s(StepComposition.single(load))
        return alone_s * self._num_sms / (self._num_sms - steps_sms) * LANE_CHUNK_OVERHEAD

    def submit_lane(self, plan: StepPlan, steps_sms: int | None) -> None:
        assert steps_sms is not None  # the driver picks one of the choices
        start_s = max(self.clock(), self._free_at_s)
        self._free_at_s = start_s + self.chunk_s(plan, steps_sms)
        self._ends_s.append(self._free_at_s)
        self.spans_s.append((start_s, self._free_at_s, steps_sms))

    def lane_result(self, timeout_s: float | None) -> StepResult | None:
        """The oldest chunk's (empty) result once the clock has reached its end; None before
        (the simulator moves the clock, never this)."""
        if not self._ends_s:
            raise RuntimeError("no prefill lane chunk in flight")
        if self._ends_s[0] > self.clock():
            return None
        self._ends_s.popleft()
        return StepResult(0)
