"""Building what the driver sends every worker for one micro-batch (`PlanBuilder`).

The scheduler's `SchedulerOutput` refers to live `Request` objects; a `StepPlan`
(`wire/plan.py`, shared with the workers) is its plain-data, serializable form. One
plan is built per scheduled micro-batch and sent, unchanged, to every rank; each
rank picks the part of its KVP group.

Workers mirror the block tables of their own group (see `worker/block_table.py`)
and receive only what changed, so a 1M-token request does not resend 60K block
ids every step::

    plan k:   freed_kv ──> drop the mirror of preempted / finished requests
              finished ──> forget their sampling parameters too
              new_requests ──> remember sampling parameters (every rank) and, for penalties,
                               the prompt (the reporting ranks keep a TokenHistory fed by chunks)
              chunks[i].pieces[j] ──> group j' blocks: mirror[num_known_blocks:] = new_block_ids

    A decode ahead (async scheduling) carries token_ids == (UNRESOLVED_TOKEN_ID,): its
    input is what plan k-1 samples for the request, which the worker takes on the device.

    Every rank applies plan k's updates when it starts plan k, in plan order, so a
    stage still busy with plan k-1 never sees plan k's blocks early. Block ids
    freed by a preemption may be reused in the very next plan: stages run plans in
    order, so the old owner's in-flight writes land before the new owner writes.

`ChunkPlan.pieces` lists every piece holding keys of [0, chunk.end); the last one
is the owner (it holds the chunk's own positions, writes their K/V and samples).
With prefix caching the leading blocks of a request may be another request's cached
blocks: the same block id then sits in both requests' mirrors, and the workers only
read it. A chunk's written slots never fall in a cached block (`check_writable`).
"""

from __future__ import annotations

from mnemosyne.engine.scheduler import Scheduler
from mnemosyne.engine.scheduler_output import ScheduledChunk, SchedulerOutput
from mnemosyne.kv_cache.manager import KVCacheManager
from mnemosyne.request import Request
from mnemosyne.wire.plan import UNRESOLVED_TOKEN_ID, ChunkPlan, NewRequest, PiecePlan, StepPlan


def new_request(req: Request) -> NewRequest:
    sp = req.sampling_params
    if not sp.needs_history:
        return NewRequest(req.request_id, sp)
    return NewRequest(
        req.request_id,
        sp,
        num_prompt_tokens=req.num_prompt_tokens,
        prompt_token_ids=tuple(req.prompt_token_ids.tolist()) if sp.penalises_repetition else (),
        min_tokens_banned_ids=(
            tuple(dict.fromkeys((*req.eos_token_ids, *sp.stop_token_ids))) if sp.min_tokens else ()
        ),
    )


def prompt_logprob_positions(chunk: ScheduledChunk) -> range:
    """Prompt positions p in this chunk whose logits score prompt token p + 1."""
    req = chunk.request
    if req.sampling_params.prompt_logprobs is None:
        return range(0)
    lo = max(chunk.start, req.num_prompt_logprobs_done)
    hi = min(chunk.end, req.num_prompt_tokens - 1)
    return range(lo, max(lo, hi))


class PlanBuilder:
    """Driver side: turns SchedulerOutputs into StepPlans, tracking what workers know.

    Per request it remembers the epoch (preemption count) and, per KVP group, how
    many block ids were sent. A request that the scheduler no longer knows is
    `finished`; one whose epoch changed, or that went back to waiting, is in
    `freed_kv` and resent from scratch when it runs again.
    """

    def __init__(self, scheduler: Scheduler, kv_manager: KVCacheManager) -> None:
        self.scheduler = scheduler
        self.kv_manager = kv_manager
        self._next_step_id = 0
        self._known: dict[str, Request] = {}  # sampling parameters sent
        self._epoch: dict[str, int] = {}  # request id -> epoch of the mirrored blocks
        self._sent_blocks: dict[str, dict[int, int]] = {}  # request id -> group -> blocks sent

    def build(self, sched: SchedulerOutput) -> StepPlan:
        finished, freed = self._retire()
        new_requests: list[NewRequest] = []
        chunks: list[ChunkPlan] = []
        for chunk in sched.chunks:
            req = chunk.request
            rid = req.request_id
            if self._known.get(rid) is not req:
                self._known[rid] = req
                new_requests.append(new_request(req))
            if rid not in self._sent_blocks:
                self._sent_blocks[rid] = {}
                self._epoch[rid] = req.num_preemptions
            chunks.append(self._chunk_plan(chunk))
        plan = StepPlan(
            step_id=self._next_step_id,
            chunks=tuple(chunks),
            new_requests=tuple(new_requests),
            freed_kv=tuple(freed),
            finished=tuple(finished),
        )
        self._next_step_id += 1
        return plan

    def _retire(self) -> tuple[list[str], list[str]]:
        finished = [rid for rid, req in self._known.items() if self.scheduler.get_request(rid) is not req]
        for rid in finished:
            del self._known[rid]
        freed: list[str] = []
        for rid in list(self._sent_blocks):
            req = self.scheduler.get_request(rid)
            if (
                req is None
                or req is not self._known.get(rid)
                or req.num_preemptions != self._epoch[rid]
                or not self.kv_manager.has_request(rid)
            ):
                freed.append(rid)
                del self._sent_blocks[rid]
                del self._epoch[rid]
        return finished, freed

    def _chunk_plan(self, chunk: ScheduledChunk) -> ChunkPlan:
        req = chunk.request
        sent = self._sent_blocks[req.request_id]
        pieces: list[PiecePlan] = []
        for piece in self.kv_manager.pieces(req.request_id):
            if piece.token_start >= chunk.end:
                break
            known = sent.get(piece.group, 0)
            new = tuple(piece.block_ids[known:])
            sent[piece.group] = len(piece.block_ids)
            pieces.append(PiecePlan(piece.group, piece.token_start, piece.token_end, known, new))
        if not pieces or not pieces[-1].token_start <= chunk.start < chunk.end <= pieces[-1].token_end:
            raise AssertionError(
                f"chunk [{chunk.start}, {chunk.end}) of {req.request_id!r} is not inside its newest "
                f"KV piece {pieces[-1:]}"
            )
        self.kv_manager.check_writable(req.request_id, chunk.start, chunk.end)  # never into cached blocks
        plp = prompt_logprob_positions(chunk)
        return ChunkPlan(
            request_id=req.request_id,
            start=chunk.start,
            num_tokens=chunk.num_tokens,
            sample=chunk.sample,
            token_ids=self._decode_input(req, chunk.start)
            if chunk.num_tokens == 1
            else req.token_ids_in(chunk.start, chunk.end),
            pieces=tuple(pieces),
            prompt_logprob_start=plp.start,
            prompt_logprob_targets=tuple(req.prompt_token_ids[plp.start + 1 : plp.stop + 1].tolist()),
        )

    @staticmethod
    def _decode_input(req: Request, position: int) -> tuple[int]:
        """A 1-token chunk's input; a decode ahead's token is not known yet (async scheduling)."""
        if position == req.num_tokens:
            return (UNRESOLVED_TOKEN_ID,)
        return (req.token_id_at(position),)
