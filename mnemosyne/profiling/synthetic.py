"""Synthetic steps: a step composition as a `StepPlan` over made-up block tables.

Attention cost does not depend on the cached values, so a step of "c query tokens
after P keys" runs over whatever the blocks hold. Every sequence of a synthetic step
is a fresh request id; a later plan retires it (freed_kv + finished): the next one, or
with `max_live_plans` = 2 (two plans in flight) the one after, so that no plan frees a
request of a step whose result has not been collected. Its KV is
laid out the way the KV manager would, T-aligned pieces on groups 0, 1, 2, ...::

    sequence [0, end):  piece j = [jT, min((j+1)T, end)) on group j % kvp
    block ids: from a per-group cursor, wrapping around the pool (sequences may share
               blocks; their writes land on garbage keys, never read for anything but timing)
               CONTIGUOUS  a piece's n blocks are first, first+1, ..., first+n-1: one run,
                           which the cuDNN path reads as a strided view
               SCATTERED   the same ids in descending order: no two consecutive, so the
                           cuDNN path gathers every prefix segment (`kernels/cudnn_prefill.py`),
                           as in an engine whose long prompt's blocks interleave with the
                           blocks its decodes take (the run breaks at the first such block)
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass

from mnemosyne.engine.step_load import add_chunk, chunk_spans
from mnemosyne.latency.composition import GroupLoad, StepComposition
from mnemosyne.sampling_params import SamplingParams
from mnemosyne.wire.plan import ChunkPlan, NewRequest, PiecePlan, StepPlan

_GREEDY = SamplingParams(temperature=0, max_tokens=1)


class BlockLayout(enum.Enum):
    CONTIGUOUS = "contiguous"
    SCATTERED = "scattered"


@dataclass(frozen=True)
class SyntheticSeq:
    num_tokens: int  # query tokens (1 = a decode)
    start: int  # keys before them


class SyntheticPlanner:
    def __init__(
        self,
        block_size: int,
        num_blocks_per_group: tuple[int, ...],
        max_tokens_per_kvp_group: int | None,
        block_layout: BlockLayout = BlockLayout.CONTIGUOUS,
        max_live_plans: int = 1,
    ):
        self.block_size = block_size
        self.block_layout = block_layout
        self.max_live_plans = max_live_plans
        self.num_blocks_per_group = num_blocks_per_group
        self.max_tokens_per_kvp_group = max_tokens_per_kvp_group
        self._ids = itertools.count()
        self._step_ids = itertools.count()
        self._cursor = [0] * len(num_blocks_per_group)
        self._live: list[tuple[str, ...]] = []  # request ids of the plans not retired, oldest first

    @property
    def num_kvp_groups(self) -> int:
        return len(self.num_blocks_per_group)

    def composition(self, seqs: list[SyntheticSeq]) -> StepComposition:
        groups = [GroupLoad()] * self.num_kvp_groups
        shared = 0
        for s in seqs:
            spans = chunk_spans(s.start, s.num_tokens, self.max_tokens_per_kvp_group)
            for piece, prefix, owns in spans:
                g = piece % self.num_kvp_groups
                groups[g] = add_chunk(groups[g], s.num_tokens, prefix, owns, sample=owns)
            shared += s.num_tokens if len(spans) > 1 else 0
        return StepComposition(tuple(groups), shared)

    def plan(self, seqs: list[SyntheticSeq]) -> StepPlan:
        chunks, new = [], []
        for s in seqs:
            rid = f"profile-{next(self._ids)}"
            new.append(NewRequest(rid, _GREEDY))
            end = s.start + s.num_tokens
            chunks.append(
                ChunkPlan(
                    request_id=rid,
                    start=s.start,
                    num_tokens=s.num_tokens,
                    sample=True,
                    token_ids=(1,) * s.num_tokens,
                    pieces=self._pieces(end),
                    prompt_logprob_start=s.start,
                    prompt_logprob_targets=(),
                )
            )
        self._live.append(tuple(c.request_id for c in chunks))
        retired = self._live.pop(0) if len(self._live) > self.max_live_plans else ()
        return StepPlan(next(self._step_ids), tuple(chunks), tuple(new), freed_kv=retired, finished=retired)

    def retire_plan(self) -> StepPlan:
        """An empty plan that drops every live request."""
        retired = tuple(r for ids in self._live for r in ids)
        self._live = []
        return StepPlan(next(self._step_ids), (), (), freed_kv=retired, finished=retired)

    def _pieces(self, end: int) -> tuple[PiecePlan, ...]:
        t = self.max_tokens_per_kvp_group or end
        pieces = []
        for j, lo in enumerate(range(0, end, t)):
            hi = min(lo + t, end)
            g = j % self.num_kvp_groups
            n = -(-(hi - lo) // self.block_size)
            pool = self.num_blocks_per_group[g]
            if n > pool:
                raise ValueError(
                    f"a synthetic piece of {hi - lo} tokens needs {n} blocks; group {g} has {pool}"
                )
            first = self._cursor[g] if self._cursor[g] + n <= pool else 0
            self._cursor[g] = first + n
            ids = range(first, first + n)
            pieces.append(PiecePlan(g, lo, hi, 0, tuple(reversed(ids) if self.block_layout is BlockLayout.SCATTERED else ids)))
        return tuple(pieces)
