"""Turn scheduled chunks into the `StepComposition` a latency model predicts.

Which KVP groups a chunk [start, start + n) of a request touches (T = max tokens per
group; pieces are T-aligned, see `kv_cache/manager.py`)::

    keys:   [ piece 0: 0..T ) [ piece 1: T..2T ) ... [ piece k: kT .. start | own n keys )
    piece j < k  (older):  n queries over T prefix keys, no own keys, no sampling
    piece k      (owner):  n queries over start - kT prefix keys + the n own keys (causal)
    k > 0: the n query tokens are merged across groups (StepComposition.num_shared_tokens)

A piece the request does not hold yet (a new request, or the next group being
onboarded) is placed where `allocate_slots` would put it: the unused group with the
most free blocks (ties: the lowest index). Without T a request stays on one group.
"""

from __future__ import annotations

from mnemosyne.engine.scheduler_output import SchedulerOutput
from mnemosyne.kv_cache.manager import KVCacheManager
from mnemosyne.latency.composition import GroupLoad, StepComposition
from mnemosyne.request import Request


def chunk_spans(start: int, num_tokens: int, max_tokens_per_kvp_group: int | None) -> list[tuple[int, int, bool]]:
    """(piece index, prefix keys on that piece, owns) for every piece a chunk's queries visit."""
    t = max_tokens_per_kvp_group
    if t is None:
        return [(0, start, True)]
    k = start // t
    if (start + num_tokens - 1) // t != k:
        raise ValueError(f"chunk [{start}, {start + num_tokens}) crosses a {t}-token KVP group boundary")
    return [(j, t, False) for j in range(k)] + [(k, start - k * t, True)]


def step_composition(kv_manager: KVCacheManager, sched: SchedulerOutput) -> StepComposition:
    """The composition of a scheduled step (its KV already allocated)."""
    load = StepLoadBuilder(kv_manager)
    for chunk in sched.chunks:
        load.add(chunk.request, chunk.start, chunk.num_tokens, chunk.sample)
    return load.composition()


def add_chunk(load: GroupLoad, num_tokens: int, prefix: int, owns: bool, sample: bool) -> GroupLoad:
    """A decode (one token) reads its prefix plus, where owned, its own key."""
    if num_tokens == 1:
        return load.plus_decode(prefix + int(owns), owns=owns and sample)
    return load.plus_chunk(num_tokens, prefix, owns=owns, sample=sample)


class StepLoadBuilder:
    """The composition of the step being scheduled, grown one chunk at a time."""

    def __init__(self, kv_manager: KVCacheManager) -> None:
        self.kv_manager = kv_manager
        self.groups = [GroupLoad()] * kv_manager.num_kvp_groups
        self.num_shared_tokens = 0

    def composition(self) -> StepComposition:
        return StepComposition(tuple(self.groups), self.num_shared_tokens)

    def owner_group(self, req: Request, start: int) -> int:
        t = self.kv_manager.max_tokens_per_kvp_group
        piece = 0 if t is None else start // t
        return self._piece_groups(req, piece + 1)[piece]

    def with_chunk(self, req: Request, start: int, num_tokens: int, sample: bool) -> StepComposition:
        groups = list(self.groups)
        shared = self._apply(groups, req, start, num_tokens, sample)
        return StepComposition(tuple(groups), self.num_shared_tokens + shared)

    def add(self, req: Request, start: int, num_tokens: int, sample: bool) -> None:
        self.num_shared_tokens += self._apply(self.groups, req, start, num_tokens, sample)

    def _apply(self, groups: list[GroupLoad], req: Request, start: int, n: int, sample: bool) -> int:
        spans = chunk_spans(start, n, self.kv_manager.max_tokens_per_kvp_group)
        placed = self._piece_groups(req, len(spans))
        for piece, prefix, owns in spans:
            g = placed[piece]
            groups[g] = add_chunk(groups[g], n, prefix, owns, sample)
        return n if len(spans) > 1 else 0

    def _piece_groups(self, req: Request, num_pieces: int) -> list[int]:
        held = [p.group for p in self.kv_manager.pieces(req.request_id)]
        if len(held) >= num_pieces:
            return held[:num_pieces]
        free = [self.kv_manager.num_free_blocks(g) for g in range(self.kv_manager.num_kvp_groups)]
        while len(held) < num_pieces:
            unused = [g for g in range(len(free)) if g not in held] or list(range(len(free)))
            held.append(max(unused, key=lambda g: (free[g], -g)))
        return held[:num_pieces]
