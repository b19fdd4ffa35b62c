"""The scheduler's view of the prefill lane: its owner, its chunks in flight, and the KV it
must not free yet (engine/scheduler.py draws the lane; engine/prefill_lane.py runs it).

    owner          the running request whose prompt the lane prefills; the steps skip it
    started        the requests that have had a lane chunk: each stays a lane candidate while
                   it has lane work left, also below `min_prompt_tokens` (displaced by a more
                   urgent prompt, it queues instead of prefilling beside the lane)
    in_flight      its lane chunks launched and not yet processed, oldest first (at most
                   MAX_LANE_CHUNKS_IN_FLIGHT: the driver queues the next chunk on the lane's
                   stream shortly before the running one ends, so the lane does not idle
                   between chunks, engine/prefill_lane.py)
    deferred_free  requests finished (done, aborted) with lane chunks in flight: their KV is
                   freed when the last of those chunks is processed, since the lane may still
                   write it; no lane chunk's request is ever a preemption victim

A lane request's tokens (T = num_tokens), by who computes them::

    [0 .. a)  the steps (its admission chunk)   [a .. T-1)  the lane, chunk by chunk   [T-1, T)  a step
    (it samples); with chunks in flight in the lane it is never a preemption victim; finished
    or aborted meanwhile, its KV is freed only when the last is done (the lane may still write it)

While the lane has an owner and does not hold, every other running prompt that `qualifies`
waits for the lane (`waits_for_lane`): the steps give it nothing. When it holds for the
decodes (`LaneHold.FOR_DECODES`), they wait until its last chunk in flight is done, and then
prefill in the steps on every SM; when it holds for the steps' own late prompts
(`LaneHold.FOR_PROMPTS`, engine/lane_split.py) they keep waiting: the lane yields its time to
those prompts, and in the steps the owner's chunks would go first whenever its relative slack
is the lower (at its minimum progress beside a long decode, over the TBT target: 32.7-34.8-ms
steps in the 8B serving trace, benchmarks/results/README.md, "Thirty-second session").

The owner keeps the lane until its prompt is done, unless a queued prompt `overtakes` it (`claim`,
asked at every step and before every lane chunk; under LARS: when waiting would make the
queued prompt miss its TTFT deadline and the owner can still meet its own behind it). The owner then queues; nothing
is recomputed (its chunks in flight run on, its KV stays). Measured on an H200 (the 8B
serving trace, benchmarks/results/README.md, "Twenty-sixth session"): a 211K-token prompt
arriving behind a 351K-token owner took 3.14x its floor without the swap and 1.29x with it
(the owner 1.26x and 1.77x; mean long TTFT 53.0 -> 49.0 s). Sharing the lane by relative
slack instead (each chunk to the most urgent) is processor sharing: SIMULATED, two 300K-token
prompts 0.5 s apart both got their first token after ~122 s, where one after the other they
took 62 s and 123 s. Prefilled in the steps instead, beside a lane chunk and on the few SMs the
chunk leaves them, its chunks over a long prefix make the steps miss the TBT target (the
minimum progress alone: 32 tokens after 200K keys on 16 SMs is ~25 ms of the step) while it
prefills at a fraction of the lane's rate (measured on an H200: the 8B serving trace with a
210K-token prompt beside a 351K-token owner, benchmarks/results/README.md, "Twenty-fifth
session").
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from mnemosyne.config import PrefillLaneConfig
from mnemosyne.engine.scheduler_output import ScheduledChunk
from mnemosyne.engine.step_load import StepLoadBuilder
from mnemosyne.kv_cache.manager import KVCacheManager
from mnemosyne.latency.composition import StepComposition
from mnemosyne.request import Request

MAX_LANE_CHUNKS_IN_FLIGHT = 2


class LaneHold(enum.Enum):
    """Whether the lane launches chunks, and where its owner and queue prefill meanwhile."""

    NONE = enum.auto()  # chunks launch
    FOR_DECODES = enum.auto()  # the decodes need every SM: owner and queue go to the steps once
    # no lane chunk is in flight (`waits_for_lane`)
    FOR_PROMPTS = enum.auto()  # the steps' late prompts get every SM: owner and queue wait


@dataclass
class LaneState:
    owner: Request | None = None
    in_flight: deque[ScheduledChunk] = field(default_factory=deque)
    deferred_free: set[str] = field(default_factory=set)
    started: set[str] = field(default_factory=set)
    num_chunks: int = 0  # lane chunks scheduled since start
    hold: LaneHold = LaneHold.NONE

    def has_chunks_of(self, req: Request) -> bool:
        return any(chunk.request is req for chunk in self.in_flight)

    @property
    def is_full(self) -> bool:
        return len(self.in_flight) >= MAX_LANE_CHUNKS_IN_FLIGHT

    @staticmethod
    def qualifies(lane: PrefillLaneConfig, req: Request) -> bool:
        """`min_prompt_tokens` left to dispatch, and no prompt logprobs (the lane computes no logits)."""
        return (
            req.num_tokens - req.num_dispatched_tokens >= lane.min_prompt_tokens
            and req.sampling_params.prompt_logprobs is None
        )

    def waits_for_lane(self, lane: PrefillLaneConfig, req: Request) -> bool:
        """Whether the steps skip `req`: its lane chunks are in flight; or it is the owner or
        a prompt that qualifies while the lane has one, unless the lane holds for the decodes
        with no chunk in flight (the steps take the lane's prompts once they have every SM again: on
        the few a chunk leaves them, a chunk over a long prefix, even the minimum progress,
        holds the decodes' tokens 3x the TBT target; measured on an H200, 32 tokens after
        234K keys on 16 SMs: 84-94-ms steps, benchmarks/results/README.md, "Twenty-seventh
        session")."""
        if self.has_chunks_of(req):
            return True
        if self.owner is None or not self.may_own(lane, req):
            return False
        return self.hold is not LaneHold.FOR_DECODES or bool(self.in_flight)

    def may_own(self, lane: PrefillLaneConfig, req: Request) -> bool:
        """A candidate for the lane: the owner or a started request while it has prompt tokens
        left for lane chunks (all but its last), any other prompt once it `qualifies`."""
        if req is self.owner or req.request_id in self.started:
            return req.num_tokens - 1 - req.num_dispatched_tokens > 0
        return self.qualifies(lane, req)

    def forget(self, req: Request) -> None:
        """`req` left the running requests (finished, aborted or preempted)."""
        if req is self.owner:
            self.owner = None
        self.started.discard(req.request_id)

    def claim(
        self, lane: PrefillLaneConfig, running_by_priority: list[Request], overtakes: Callable[[Request, Request], bool]
    ) -> None:  # fmt: skip
        """The owner from now on: the owner while it may own the lane, unless a candidate
        (`may_own`) `overtakes(candidate, owner)` (the first such of `running_by_priority`);
        without one, the first candidate, or none."""
        candidates = [r for r in running_by_priority if self.may_own(lane, r)]
        owner = self.owner
        if owner is None or not any(r is owner for r in candidates):
            self.owner = candidates[0] if candidates else None
        else:
            self.owner = next((r for r in candidates if r is not owner and overtakes(r, owner)), owner)

    def next_chunk(self, lane: PrefillLaneConfig, kv_manager: KVCacheManager) -> ScheduledChunk | None:
        """The owner's next chunk, its KV allocated and its tokens dispatched; None while the
        lane holds, without an owner, while the owner's chunks in the steps' flight are not
        done (the chunks in the lane's flight may be an aborted owner's), at its last prompt
        token (the steps sample it), or when the cache cannot take the chunk now."""
        req = self.owner
        if self.hold is not LaneHold.NONE or req is None:
            return None
        if not self.has_chunks_of(req) and req.num_computed_tokens < req.num_dispatched_tokens:
            return None  # its chunks in the steps' flight first (the lane's stream does not wait for them)
        n = min(lane.chunk_tokens, req.num_tokens - 1 - req.num_dispatched_tokens)
        if n <= 0 or not kv_manager.allocate_slots(
            req.request_id, req.num_dispatched_tokens + n, num_known_tokens=req.num_tokens
        ):
            return None
        chunk = ScheduledChunk(req, req.num_dispatched_tokens, n, sample=False, epoch=req.num_preemptions)
        self.in_flight.append(chunk)
        self.started.add(req.request_id)
        self.num_chunks += 1
        req.num_dispatched_tokens += n
        return chunk

    @staticmethod
    def decode_load(running: Iterable[Request], kv_manager: KVCacheManager) -> StepComposition:
        """The requests that decode, or will once their chunks in flight are done (every
        prompt token but the last dispatched: an owner's last lane chunk may still run while
        the next owner's chunk is launched, and its decodes then run beside that chunk), as
        one step."""
        load = StepLoadBuilder(kv_manager)
        for req in running:
            if req.num_tokens - req.num_dispatched_tokens <= 1:
                load.add(req, req.num_tokens - 1, 1, sample=True)
        return load.composition()

    def pop_done(self) -> str | None:
        """Forget the oldest chunk in flight, which ran; the request whose KV may be freed now
        (finished meanwhile, no chunk of it left in flight), if any."""
        req = self.in_flight.popleft().request
        if req.request_id in self.deferred_free and not self.has_chunks_of(req):
            self.deferred_free.discard(req.request_id)
            return req.request_id
        return None
