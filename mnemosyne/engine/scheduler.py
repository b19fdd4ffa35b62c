"""Token-budget scheduler (vLLM-v1 / Sarathi-Serve style): no prefill or decode phases.

One step, with budget = max_num_batched_tokens::

    running, by priority
      (a) decodes first   (num_tokens - num_computed_tokens == 1)
      (b) partial prefills
          allocation fails -> preempt the lowest-priority running request not yet
          scheduled this step that holds blocks on a KVP group the failing one
          needs (possibly the failing one itself) and retry
    waiting, by priority  (skipped if anything was preempted this step)
      (c) admit while budget > 0 and len(running) < max_num_seqs; stop at the first
          one whose whole prompt the free blocks cannot hold (new arrivals never
          preempt, and a prefill is not started only to be preempted mid-way).
          With prefix caching (`prefix_lookup.py`), a request first takes over the
          longest cached run of its full blocks (at most num_tokens - 1 tokens) and starts at
          num_computed == num_dispatched == hit tokens; only the rest needs new
          blocks. Requests asking for prompt_logprobs skip the lookup (those
          positions' logits are needed) but their blocks are cached for others.
    with `priority.interleaves_waiting` (LARS), (b) and (c) are one order by priority,
    so a waiting short request can take budget before a running long prefill.

    chunk_policy.begin_step(now, num_decoding) starts the step (num_decoding: decodes, and decode
    aheads of prefills whose sampling chunk is in flight); on_scheduled(...) reports each chunk.

    for each request:  n = chunk_policy.chunk_size(req, num_pending, budget_left)
                       n = min(n, kv.num_tokens_to_group_end(id, num_dispatched))   # never straddle a group
                       kv.allocate_slots(id, num_dispatched + n, num_tokens)
                       chunk = [num_dispatched, num_dispatched + n), sample iff it reaches num_tokens
                       num_dispatched += n; budget -= n

`update_from_output` then sets num_computed_tokens = chunk.end, offers the request's
newly computed full blocks to the prefix cache, appends the sampled token of every
sampling chunk and applies the stop rules.

Async scheduling (`config.async_scheduling`, layouts with spp == 1): the engine schedules
step n+1 before it has processed step n, and a running request whose sampling chunk is in
step n may get a *decode ahead* in step n+1 (drawn in engine/decode_ahead.py, with when
one is scheduled and how its chunk is dropped once stale).

The prefill lane (`config.prefill_lane`, one device): a running prompt with at least
`min_prompt_tokens` left becomes its owner, which the steps skip, with every other such
prompt (the lane's queue); its tokens per place are drawn in engine/lane_state.py.

Invariants between calls:
    * every known request is in exactly one of waiting / running; finished ones are
      dropped (the caller keeps the Request object);
    * waiting requests hold no KV and have num_computed == num_dispatched == 0
      (preemption frees the KV and resets both; cached blocks stay in the prefix cache);
    * running requests hold slots for [0, num_dispatched_tokens) in the KV manager;
    * num_computed_tokens <= num_dispatched_tokens <= num_tokens + 1, and
      num_dispatched_tokens == num_tokens + 1 only for a decode ahead (async scheduling:
      the chunk that samples position num_tokens's token is still in flight);
    * per step: a request appears at most once, sum of chunk sizes <= budget,
      len(running) <= max_num_seqs.
Preemption is by recompute: output_token_ids are kept and recomputed as part of
the prompt on readmission.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable

from mnemosyne.config import SchedulerConfig
from mnemosyne.engine.chunking import ChunkPolicy, FixedChunkPolicy
from mnemosyne.engine.decode_ahead import can_decode_ahead
from mnemosyne.engine.lane_state import LaneHold, LaneState
from mnemosyne.engine.prefix_lookup import cache_computed_blocks, can_hold_whole_prompt, find_cached_prefix
from mnemosyne.engine.priority import FCFSPriority, PriorityPolicy
from mnemosyne.engine.scheduler_output import ScheduledChunk, SchedulerOutput, StepUpdate
from mnemosyne.errors import InvalidRequestError
from mnemosyne.kv_cache.manager import KVCacheManager
from mnemosyne.latency.composition import StepComposition
from mnemosyne.request import Request, RequestStatus


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        kv_manager: KVCacheManager,
        chunk_policy: ChunkPolicy | None = None,
        priority: PriorityPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.kv_manager = kv_manager
        self.chunk_policy: ChunkPolicy = chunk_policy or FixedChunkPolicy(config.chunk_size)
        self.priority: PriorityPolicy = priority or FCFSPriority()
        self._clock = clock
        self._requests: dict[str, Request] = {}
        self._waiting: dict[str, Request] = {}  # insertion-ordered; sorted by priority each step
        self._running: dict[str, Request] = {}
        self._admission_seq: dict[str, int] = {}
        self._seq_counter = itertools.count()
        self._num_preemptions = 0
        self._lane = LaneState()  # the prefill lane's owner and chunks (engine/lane_state.py)

    # ---- requests in ------------------------------------------------------------------------

    def add_request(self, req: Request) -> None:
        """Validate and enqueue as WAITING; raises InvalidRequestError if it can never be served."""
        req.check_servable(self.config.max_model_len, self.kv_manager.capacity_tokens_per_request)
        if req.request_id in self._requests:
            raise InvalidRequestError(f"request id {req.request_id!r} is already in use")
        req.status = RequestStatus.WAITING
        self._requests[req.request_id] = req
        self._waiting[req.request_id] = req
        self._admission_seq[req.request_id] = next(self._seq_counter)

    # ---- one step ---------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        scheduled: set[str] = set()
        budget = self.config.max_num_batched_tokens
        now = self._clock()
        running = self._sorted(self._running.values(), now)
        if (lane := self.config.prefill_lane) is not None:  # the lane's owner and queue: not in the steps
            self._lane.claim(lane, running, lambda other, owner: self.priority.overtakes(other, owner, now))
            running = [r for r in running if not self._lane.waits_for_lane(lane, r)]
        decodes = [r for r in running if not r.is_prefill]
        prefills = [r for r in running if r.is_prefill]
        # A prefill whose sampling chunk is in flight decodes (ahead) in this step too: its
        # first token gap is this step's time (H200 8B trace: 93 ms gaps when it was left out).
        num_decoding = len(decodes) + sum(1 for r in prefills if can_decode_ahead(r, self.config))
        self.chunk_policy.begin_step(now, num_decoding)
        waiting = self._sorted(self._waiting.values(), now)
        if self.priority.interleaves_waiting:  # one order: a waiting request may overtake a prefill
            order = decodes + self._sorted([*prefills, *waiting], now)
        else:
            order = decodes + prefills + waiting
        waiting_ids = {r.request_id for r in waiting}
        admitting = True
        for req in order:
            if budget <= 0:
                break
            if req.request_id in waiting_ids:
                if out.preempted_ids or len(self._running) >= self.config.max_num_seqs:
                    admitting = False
                if admitting:
                    admitting, used = self._admit(req, budget, out, scheduled)
                    budget -= used
                continue
            if req.status is not RequestStatus.RUNNING or self._num_schedulable(req) == 0:
                continue  # preempted earlier in this step, or its last chunk is still in flight
            while True:
                n = self._chunk_len(req, budget)
                if n == 0:
                    break
                if self.kv_manager.allocate_slots(
                    req.request_id, req.num_dispatched_tokens + n, num_known_tokens=req.num_tokens
                ):
                    budget -= self._emit(out, scheduled, req, n)
                    break
                victim = self._choose_victim(req, scheduled, now)
                self._preempt(victim, out)
                if victim is req:
                    break
        return out

    def _admit(
        self, req: Request, budget: int, out: SchedulerOutput, scheduled: set[str]
    ) -> tuple[bool, int]:
        """Start a waiting request: (admission still open this step, tokens scheduled).
        It first takes over its longest cached prefix (if any) and starts after it."""
        hit = find_cached_prefix(self.kv_manager, req)
        req.num_computed_tokens = req.num_dispatched_tokens = hit.num_tokens if hit else 0
        n = self._chunk_len(req, budget)
        open_ = n == 0  # nothing fits this step: later (smaller) requests may still be admitted
        if (
            n == 0
            or not can_hold_whole_prompt(self.kv_manager, req, hit)  # else it would be preempted mid-prefill
            or not self.kv_manager.allocate_slots(
                req.request_id, req.num_dispatched_tokens + n, hit, num_known_tokens=req.num_tokens
            )
        ):
            req.num_computed_tokens = req.num_dispatched_tokens = 0  # waiting requests hold nothing
            return open_, 0
        if req.num_cached_tokens is None:
            req.num_cached_tokens = req.num_computed_tokens
        del self._waiting[req.request_id]
        self._running[req.request_id] = req
        return True, self._emit(out, scheduled, req, n)

    def update_from_output(self, out: SchedulerOutput, sampled_token_ids: dict[str, int]) -> StepUpdate:
        """Record a finished step; returns the chunks applied and the requests that finished.

        A chunk is applied only if its request is still RUNNING here, in the epoch it
        was scheduled in, and the chunk continues its computed prefix (start ==
        num_computed_tokens); chunks of requests finished, aborted or preempted
        since scheduling are dropped (with a pipeline, several chunks of one request
        are in flight and complete in order).
        """
        update = StepUpdate()
        for chunk in out.chunks:
            req = chunk.request
            rid = req.request_id
            if not self.is_current(chunk):
                continue
            if chunk.sample and rid not in sampled_token_ids:
                raise KeyError(f"no sampled token for request {rid!r}, whose chunk ends at {chunk.end}")
            update.applied.append(chunk)
            req.num_computed_tokens = chunk.end
            cache_computed_blocks(self.kv_manager, req)
            if not chunk.sample:
                continue
            token = sampled_token_ids[rid]
            req.output_token_ids.append(token)
            status = req.stop_status(token, self.config.max_model_len)
            if status is not None:
                self._finish(req, status)
                update.finished.append(req)
        return update

    def is_current(self, chunk: ScheduledChunk) -> bool:
        """Would `update_from_output` apply this chunk's result now?"""
        req = chunk.request
        return (
            self._running.get(req.request_id) is req
            and chunk.epoch == req.num_preemptions
            and chunk.start == req.num_computed_tokens
        )

    def schedule_lane(self) -> SchedulerOutput | None:
        """The prefill lane's next chunk (module docstring); None when the lane is off or full,
        nothing qualifies, or the KV cache cannot take the chunk now (asked again next step)."""
        lane = self.config.prefill_lane
        if lane is None or self._lane.is_full or not self.claim_lane():
            return None
        chunk = self._lane.next_chunk(lane, self.kv_manager)
        if chunk is None:
            return None
        out = SchedulerOutput()
        out.chunks.append(chunk)
        return out

    def claim_lane(self) -> bool:
        """Whether the lane has an owner (`LaneState.claim`: the first candidate by priority
        when it has none, or one that overtakes it; only the candidates are ordered: this
        runs every step)."""
        lane = self.config.prefill_lane
        if lane is not None:
            now = self._clock()
            candidates = self._sorted([r for r in self._running.values() if self._lane.may_own(lane, r)], now)
            self._lane.claim(lane, candidates, lambda other, owner: self.priority.overtakes(other, owner, now))
        return self._lane.owner is not None

    def lane_done(self) -> None:
        """The lane's oldest chunk ran (after `update_from_output` of its output)."""
        freed = self._lane.pop_done()
        if freed is not None:
            self.kv_manager.free(freed)

    def decode_load(self) -> StepComposition:
        """The decodes as one step: what every step beside the next lane chunk must fit."""
        return LaneState.decode_load(self._running.values(), self.kv_manager)

    def steps_prompts(self) -> list[Request]:
        """The prompts the steps prefill beside the lane, most urgent first: the running ones
        with tokens to dispatch that are not the lane's (`LaneState.may_own`), and the
        waiting ones that will not queue for it and could be admitted now (a seat, and free
        blocks for the whole prompt: one that must wait for the lane's owner to free its KV
        never holds the lane for itself)."""
        lane = self.config.prefill_lane
        if lane is None:
            return []
        prompts = [
            r for r in self._running.values()
            if r.is_prefill and r.num_tokens > r.num_dispatched_tokens and not self._lane.may_own(lane, r)
        ]  # fmt: skip
        if len(self._running) < self.config.max_num_seqs:
            prompts += [
                r for r in self._waiting.values()
                if not LaneState.qualifies(lane, r) and can_hold_whole_prompt(self.kv_manager, r, None)
            ]  # fmt: skip
        return self._sorted(prompts, self._clock())

    @property
    def lane_owner(self) -> Request | None:
        return self._lane.owner

    def hold_lane(self, hold: LaneHold) -> None:
        """Hold the lane (no chunk launches; engine/lane_state.py `LaneHold`) or release it (NONE)."""
        self._lane.hold = hold

    @property
    def lane_full(self) -> bool:
        return self._lane.is_full

    @property
    def lane_busy(self) -> bool:
        return bool(self._lane.in_flight)

    @property
    def num_lane_chunks(self) -> int:
        return self._lane.num_chunks

    def finish_request(self, request_id: str, status: RequestStatus) -> Request | None:
        """Finish from outside (abort, stop string): frees its KV. Unknown ids return None."""
        if not status.finished:
            raise ValueError(f"finish_request needs a finished status, got {status}")
        req = self._requests.get(request_id)
        if req is None:
            return None
        self._finish(req, status)
        return req

    # ---- queries ----------------------------------------------------------------------------

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_preemptions(self) -> int:
        return self._num_preemptions

    def get_request(self, request_id: str) -> Request | None:
        """A waiting or running request; None once finished or if unknown."""
        return self._requests.get(request_id)

    # ---- internals --------------------------------------------------------------------------

    def _sorted(self, reqs: Iterable[Request], now: float) -> list[Request]:
        return sorted(reqs, key=lambda r: (*self.priority.key(r, now), self._admission_seq[r.request_id]))

    def _num_schedulable(self, req: Request) -> int:
        """Tokens `req` may dispatch now: its pending ones, or 1 for a decode ahead."""
        return req.num_pending_tokens or int(can_decode_ahead(req, self.config))

    def _chunk_len(self, req: Request, budget: int) -> int:
        if req.num_pending_tokens == 0:  # a decode ahead (or nothing): one token, no policy
            n = min(self._num_schedulable(req), budget)
        else:
            n = self.chunk_policy.chunk_size(req, req.num_pending_tokens, budget)
            n = max(0, min(n, req.num_pending_tokens, budget))
        limit = self.kv_manager.num_tokens_to_group_end(req.request_id, req.num_dispatched_tokens)
        if limit is not None:
            n = min(n, limit)
        return n

    def _emit(self, out: SchedulerOutput, scheduled: set[str], req: Request, n: int) -> int:
        start = req.num_dispatched_tokens
        sample = start + n >= req.num_tokens  # a decode ahead ends at num_tokens + 1
        out.chunks.append(
            ScheduledChunk(request=req, start=start, num_tokens=n, sample=sample, epoch=req.num_preemptions)
        )
        req.num_dispatched_tokens += n
        req.status = RequestStatus.RUNNING
        scheduled.add(req.request_id)
        self.chunk_policy.on_scheduled(req, start, n, sample)
        return n

    def _choose_victim(self, req: Request, scheduled: set[str], now: float) -> Request:
        """The lowest-priority running request not scheduled this step that holds blocks on a
        KVP group `req` needs (`groups_to_grow`); `req` itself when none ranks below it.
        Never a request of higher priority than `req`. With one group every victim helps."""
        candidates = self._sorted(
            [r for r in self._running.values() if r.request_id not in scheduled and not self._lane.has_chunks_of(r)],
            now,
        )
        needed = self.kv_manager.groups_to_grow(req.request_id)
        for victim in reversed(candidates):
            if victim is req or self.kv_manager.groups_of(victim.request_id) & needed:
                return victim
        return req

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self._lane.forget(req)  # nothing of it in flight in the lane (never a victim then)
        self.kv_manager.free(req.request_id)
        req.num_computed_tokens = 0
        req.num_dispatched_tokens = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self._num_preemptions += 1
        del self._running[req.request_id]
        self._waiting[req.request_id] = req
        out.preempted_ids.append(req.request_id)

    def _finish(self, req: Request, status: RequestStatus) -> None:
        rid = req.request_id
        self._waiting.pop(rid, None)
        self._running.pop(rid, None)
        self._requests.pop(rid, None)
        self._admission_seq.pop(rid, None)
        self._lane.forget(req)
        if self._lane.has_chunks_of(req):
            self._lane.deferred_free.add(rid)  # the lane may still write its blocks
        else:
            self.kv_manager.free(rid)
        req.status = status
