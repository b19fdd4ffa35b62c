"""The scheduler's view of the prefill lane: its owner, its chunks in flight, and the KV it
must not free yet (engine/scheduler.py draws the lane; engine/prefill_lane.py runs it).

    owner          the running request whose prompt the lane prefills; the steps skip it
    in_flight      its lane chunks launched and not yet processed, oldest first (at most
                   MAX_LANE_CHUNKS_IN_FLIGHT: the next chunk is queued on the lane's stream
                   while one runs, so the lane never idles between chunks)
    deferred_free  requests finished (done, aborted) with lane chunks in flight: their KV is
                   freed when the last of those chunks is processed, since the lane may still
                   write it; no lane chunk's request is ever a preemption victim

While the lane has an owner and does not hold, every other running prompt that `qualifies`
waits for the lane (`waits_for_lane`): the steps give it nothing, and it becomes the owner, by priority, when
the lane is free. Prefilled in the steps instead, beside a lane chunk and on the few SMs the
chunk leaves them, its chunks over a long prefix make the steps miss the TBT target (the
minimum progress alone: 32 tokens after 200K keys on 16 SMs is ~25 ms of the step) while it
prefills at a fraction of the lane's rate (measured on an H200: the 8B serving trace with a
210K-token prompt beside a 351K-token owner, benchmarks/results/README.md, "Twenty-fifth
session").
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from mnemosyne.config import PrefillLaneConfig
from mnemosyne.engine.scheduler_output import ScheduledChunk
from mnemosyne.kv_cache.manager import KVCacheManager
from mnemosyne.request import Request

MAX_LANE_CHUNKS_IN_FLIGHT = 2


@dataclass
class LaneState:
    owner: Request | None = None
    in_flight: deque[ScheduledChunk] = field(default_factory=deque)
    deferred_free: set[str] = field(default_factory=set)
    num_chunks: int = 0  # lane chunks scheduled since start
    held: bool = False  # the steps need every SM: no chunk launches; owner and queue are the steps'

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
        """Whether the steps skip `req`: its lane chunks are in flight; or, unless the lane
        holds, it is the owner or a prompt that qualifies while the lane has one."""
        if self.has_chunks_of(req):
            return True
        return not self.held and self.owner is not None and (req is self.owner or self.qualifies(lane, req))

    def claim(self, lane: PrefillLaneConfig, running_by_priority: list[Request]) -> None:
        """With no owner, the first of `running_by_priority` that `qualifies` becomes it."""
        if self.owner is None:
            self.owner = next((r for r in running_by_priority if self.qualifies(lane, r)), None)

    def next_chunk(self, lane: PrefillLaneConfig, kv_manager: KVCacheManager) -> ScheduledChunk | None:
        """The owner's next chunk, its KV allocated and its tokens dispatched; None while the
        lane holds, without an owner, while the owner's chunks in the steps' flight are not
        done (the chunks in the lane's flight may be an aborted owner's), at its last prompt
        token (the steps sample it), or when the cache cannot take the chunk now."""
        req = self.owner
        if self.held or req is None:
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
        self.num_chunks += 1
        req.num_dispatched_tokens += n
        return chunk

    def pop_done(self) -> str | None:
        """Forget the oldest chunk in flight, which ran; the request whose KV may be freed now
        (finished meanwhile, no chunk of it left in flight), if any. The owner goes back to the
        steps at its last prompt token."""
        req = self.in_flight.popleft().request
        freed = None
        if req.request_id in self.deferred_free and not self.has_chunks_of(req):
            self.deferred_free.discard(req.request_id)
            freed = req.request_id
        owner = self.owner
        if owner is not None and not self.in_flight and owner.num_tokens - owner.num_dispatched_tokens <= 1:
            self.owner = None
        return freed
