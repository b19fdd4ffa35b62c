"""Which SMs the next prefill lane chunk leaves the steps, or whether the lane holds
(engine/prefill_lane.py draws the lane; latency/beside_lane.py times the steps beside it).

    D        the decodes, as one step (`Scheduler.decode_load`)
    S_0      the fewest SMs of the choices on which D fits (`BesideLaneLatencyModel.fewest_sms`);
             none (D needs every SM): hold for the decodes (`LaneHold.FOR_DECODES`)
    Q        the prompts the steps prefill beside the lane, most urgent first
             (`Scheduler.steps_prompts`): q_1 .. q_k with r_i tokens left, due_i = arrival +
             TTFT deadline (LARS; without deadlines, FCFS, the split is S_0)
    rate(S)  tokens a second the steps give Q on S SMs: c / step(D + a c-token chunk), c the
             largest multiple of the granule (up to the step's token cap) whose step fits
             LANE_STEP_HEADROOM x the target there, else the minimum chunk over it (the chunk
             policy's own rules, at q_1's prefix); rate(every SM) likewise within the target
    end_i(S)       = now + (r_1 + .. + r_i) / rate(S)                beside a chunk on S SMs
    end_i(held)    = now + drain + (r_1 + .. + r_i) / rate(every SM)  the chunks in flight end first

    the split = the fewest S >= S_0 of the choices with every end_i(S) <= due_i
    else hold for the prompts (`LaneHold.FOR_PROMPTS`: the owner waits, the prompts have the steps)
                iff a q_i late on the widest split ends sooner held (the first such: q), and the
                owner can spare the lane's idle time I = (r_1 + .. + r_k) / rate(every SM):
                    end = now + drain + remaining(owner)     (LARS's prediction, as `overtakes`)
                    end + I <= due(owner)                    it still meets its deadline, or
                    end > due(owner) and q's relative slack < the owner's   late either way,
                                                             the more urgent by LARS's order goes first
    else S_0    (late either way, or the owner cannot spare it: the lane keeps its pace)

Why: beside a lane chunk on 32 SMs, with a 210K-token decode among the decodes, a 3717-token
prompt got ~2 ms of each 27-ms step and 32-token chunks, and its first token came after 3.9 s;
on every SM the same decodes leave room for 512-token chunks, ~8 steps (H200, the 8B serving
trace, benchmarks/results/README.md, "Thirty-first session").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

from mnemosyne.engine.adaptive_chunking import largest_fitting_multiple
from mnemosyne.engine.lane_state import LaneHold
from mnemosyne.engine.priority import LARSPriority
from mnemosyne.latency.beside_lane import LANE_STEP_HEADROOM, BesideLaneLatencyModel
from mnemosyne.latency.composition import StepComposition
from mnemosyne.request import Request


@dataclass(frozen=True)
class StepChunks:
    """The chunk policy's sizes for the rates: multiples of `granularity_tokens` up to
    `max_tokens` a step, and `min_tokens` a step when none fits (over the target)."""

    granularity_tokens: int = 32
    min_tokens: int = 32
    max_tokens: int = 2048


class LaneSplitChooser:
    """The next lane chunk's split (module docstring): `choose` gives the SMs it leaves the
    steps, or a hold. `beside` times the steps on a split, `beside.inner` on every
    SM; `lars`: the deadlines (None: the decodes alone decide)."""

    def __init__(
        self,
        beside: BesideLaneLatencyModel,
        target_s: float,
        lars: LARSPriority | None = None,
        chunks: StepChunks = StepChunks(),
    ) -> None:
        self.beside = beside
        self.target_s = target_s
        self.lars = lars
        self.chunks = chunks
        self.num_holds_for_prompts = 0  # choices that held the lane for the steps' prompts

    def choose(
        self,
        decodes: StepComposition,
        prompts: Sequence[Request],
        owner: Request,
        num_sms: int,
        choices: Sequence[int],
        now: float,
        drain_s: float,
    ) -> int | LaneHold:
        """The SMs of `choices` (of `num_sms`) the next chunk of `owner` leaves the steps, or a
        hold (never `LaneHold.NONE`). `prompts`: the steps' prompts, most urgent first;
        `drain_s`: seconds until the lane's chunks in flight are done."""
        fewest = self.beside.fewest_sms(decodes, num_sms, choices, self.target_s)
        if fewest is None:
            return LaneHold.FOR_DECODES
        if self.lars is None or not prompts:
            return fewest
        lars = self.lars
        dues = [p.arrival_time + lars.deadline_s(p) for p in prompts]
        ahead = list(accumulate(p.num_tokens - p.num_dispatched_tokens for p in prompts))  # r_1 + .. + r_i
        prefix = prompts[0].num_dispatched_tokens
        rate_widest = 0.0  # of the last split tried, the widest
        for steps_sms in sorted(s for s in choices if s >= fewest):
            rate_widest = self._rate(decodes, prefix, steps_sms / num_sms)
            if all(now + n / rate_widest <= due for n, due in zip(ahead, dues)):
                return steps_sms
        rate_held = self._rate(decodes, prefix, None)
        saved = [  # the prompts late on the widest split that a hold brings forward
            p for p, n, due in zip(prompts, ahead, dues, strict=True)
            if now + n / rate_widest > due and drain_s + n / rate_held < n / rate_widest
        ]  # fmt: skip
        if saved and self._owner_spares(owner, saved[0], now + drain_s, ahead[-1] / rate_held, now):
            self.num_holds_for_prompts += 1
            return LaneHold.FOR_PROMPTS
        return fewest

    def _owner_spares(
        self, owner: Request, prompt: Request, resume: float, idle_s: float, now: float
    ) -> bool:
        """Whether `owner` may leave the lane idle `idle_s` from `resume` for `prompt`: it still
        meets its TTFT deadline after the hold, or it misses it either way and `prompt` is the
        more urgent by LARS's relative slack."""
        assert self.lars is not None
        due = owner.arrival_time + self.lars.deadline_s(owner)
        end = resume + self.lars.remaining_prefill_s(owner)
        if end + idle_s <= due:
            return True
        return end > due and self.lars.slack_fraction(prompt, now) < self.lars.slack_fraction(owner, now)

    def _rate(self, decodes: StepComposition, prefix: int, steps_share: float | None) -> float:
        """Prompt tokens a second in steps beside `decodes` (module docstring's rate) on
        `steps_share` of the SMs beside a chunk, or on every SM (None)."""
        c = self.chunks
        (frame,) = decodes.groups

        def step_s(n: int) -> float:
            step = StepComposition.single(frame.plus_chunk(n, prefix))
            if steps_share is None:
                return self.beside.inner.step_time_s(step)
            return self.beside.confined_s(step, steps_share) / LANE_STEP_HEADROOM

        fitting = largest_fitting_multiple(
            lambda k: step_s(k) <= self.target_s, c.max_tokens, c.granularity_tokens
        )
        n = fitting or c.min_tokens
        return n / step_s(n)
