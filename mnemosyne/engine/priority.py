"""Which request goes first.

A policy maps a request to a sort key; smaller is more urgent. The scheduler sorts
by ``(*policy.key(request, now), admission_seq)``, where admission_seq is the order
in which `Scheduler.add_request` saw the request, so equal keys are always broken
the same way and any policy yields a deterministic total order.

`FCFSPriority` orders by arrival; `LARSPriority` by relative slack against a deadline
from the latency model.
"""

from __future__ import annotations

from typing import Protocol

from mnemosyne.engine.prefill_time import PrefillTimeTable
from mnemosyne.request import Request


class PriorityPolicy(Protocol):
    interleaves_waiting: bool  # True: waiting requests and running partial prefills share one order

    def key(self, request: Request, now: float) -> tuple:
        """Sort key of `request` at time `now`; smaller = more urgent."""
        ...

    def overtakes(self, challenger: Request, holder: Request, now: float) -> bool:
        """Whether `challenger`, queued for what `holder` has (the prefill lane), should take
        it at `now` (the holder then queues; no work is lost)."""
        ...


class FCFSPriority:
    """First come, first served: by arrival_time (ties: admission order, added by the scheduler).
    Running partial prefills go before any waiting request."""

    interleaves_waiting = False

    def key(self, request: Request, now: float) -> tuple:
        return (request.arrival_time,)

    def overtakes(self, challenger: Request, holder: Request, now: float) -> bool:
        return False  # first come, first served


def ttft_deadline_s(
    prefill_time: PrefillTimeTable, num_prompt_tokens: int, deadline_factor: float, min_deadline_s: float
) -> float:
    """A request's TTFT deadline: max(factor * predicted whole-prefill time, minimum)."""
    return max(deadline_factor * prefill_time.time_s(num_prompt_tokens), min_deadline_s)


class LARSPriority:
    """Least relative slack first (Medha's LARS), recomputed at every call, so no order goes stale.

        deadline  = max(deadline_factor * T(prompt), min_deadline_s)     T: `PrefillTimeTable`
        remaining = T(num_tokens) - T(num_dispatched)                    0 once decoding
        slack     = arrival + deadline - now - remaining
        priority  = slack / deadline                                     smaller = more urgent

    The key puts decodes before prefills, so the scheduler's victim (its lowest-priority
    running request) is the prefill with the most relative slack, and decodes only after
    every partial prefill. `interleaves_waiting`: waiting requests compete with running
    partial prefills in one order, so a short request overtakes a long prefill.
    """

    interleaves_waiting = True

    def __init__(
        self, prefill_time: PrefillTimeTable, deadline_factor: float = 1.5, min_deadline_s: float = 0.5
    ) -> None:
        self.prefill_time = prefill_time
        self.deadline_factor = deadline_factor
        self.min_deadline_s = min_deadline_s

    def deadline_s(self, request: Request) -> float:
        return ttft_deadline_s(
            self.prefill_time, request.num_prompt_tokens, self.deadline_factor, self.min_deadline_s
        )

    def remaining_prefill_s(self, request: Request) -> float:
        if not request.is_prefill:
            return 0.0
        return self.prefill_time.remaining_s(request.num_tokens, request.num_dispatched_tokens)

    def slack_s(self, request: Request, now: float) -> float:
        return request.arrival_time + self.deadline_s(request) - now - self.remaining_prefill_s(request)

    def slack_fraction(self, request: Request, now: float) -> float:
        return self.slack_s(request, now) / self.deadline_s(request)

    def key(self, request: Request, now: float) -> tuple:
        return (int(request.is_prefill), self.slack_fraction(request, now))

    def overtakes(self, challenger: Request, holder: Request, now: float) -> bool:
        """A swap that saves a deadline the holder can spare: both prefills, one after the
        other, end at end = now + remaining(holder) + remaining(challenger) either way round;
        the challenger overtakes iff waiting makes it miss its deadline (end > its due time)
        and the holder still meets its own behind it (end <= its due time). So the holder is
        never made late, a request that would be late either way never displaces one, and
        no swap is ever undone (after it the holder, now queued, is not the one that misses).

            due(r) = r.arrival + deadline(r);   overtakes iff due(challenger) < end <= due(holder)
        """
        end = now + self.remaining_prefill_s(holder) + self.remaining_prefill_s(challenger)
        due_challenger = challenger.arrival_time + self.deadline_s(challenger)
        due_holder = holder.arrival_time + self.deadline_s(holder)
        return due_challenger < end <= due_holder
