"""The scheduler's plan for one step (chunks of live requests), which `engine/step_plan.py` turns into
the workers' `StepPlan` and the simulator times; and what recording its results changed."""

from __future__ import annotations

from dataclasses import dataclass, field

from mnemosyne.request import Request


@dataclass
class ScheduledChunk:
    """Tokens [start, start + num_tokens) of one request, run in this step.

    `sample` is True when the chunk reaches the request's last known token, so the
    logits of its final position pick the next output token. A decode is a chunk
    with num_tokens == 1 and sample == True. `epoch` is the request's preemption
    count when scheduled: a result for an older epoch is stale and dropped.
    """

    request: Request
    start: int
    num_tokens: int
    sample: bool
    epoch: int = 0

    @property
    def end(self) -> int:
        return self.start + self.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)  # decodes first, then prefill chunks
    preempted_ids: list[str] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


@dataclass
class StepUpdate:
    """What `Scheduler.update_from_output` recorded: the chunks it applied (schedule order; stale
    ones dropped) and the requests that finished."""

    applied: list[ScheduledChunk] = field(default_factory=list)
    finished: list[Request] = field(default_factory=list)
