"""Every process group of the 3D layout (TP x SPP x KVP) lives here.

Rank table, rank = (kvp_rank * spp + spp_rank) * tp + tp_rank. Example tp=2, spp=2, kvp=2::

                      KVP group 0                      KVP group 1
                 stage 0       stage 1            stage 0       stage 1
    tp_rank 0    rank 0  ───>  rank 2             rank 4  ───>  rank 6
    tp_rank 1    rank 1  ───>  rank 3             rank 5  ───>  rank 7
                 └ TP ─┘       └ TP ─┘            └ TP ─┘       └ TP ─┘

    TP group      (kvp_rank, spp_rank) fixed, tp_rank varies:   {0,1} {2,3} {4,5} {6,7}
    pipeline      (kvp_rank, tp_rank) fixed, spp_rank varies:   0->2, 1->3, 4->6, 5->7  (P2P sends,
                                                                 one two-rank group per link)
    KVP process   (spp_rank, tp_rank) fixed, kvp_rank varies:   {0,4} {1,5} {2,6} {3,7}
    world         every rank:                                   {0..7}  (the default process
                                                                 group; decode-ahead inputs only)

* A KVP group g (`kvp_rank` g of its ranks; `group` g in the KV cache, the plans and the
  worker) is a full copy of the model, split into `spp` stages of `tp` ranks, holding
  the KV of the token ranges placed on group g. It is not a process group.
* The KVP *process* group of a rank (`ProcessGroups.kvp`) is the set of its peers in
  the other KVP groups at the same stage and TP rank: the ranks whose attention
  partials for the same heads and layers it merges.
* Naming: an int `group` is always a KVP group's index; a torch.distributed group is a
  `process_group`, held in a `GroupHandle` (`ProcessGroups.tp`, `.kvp`, `.world`).
* Stage s owns decoder layers `stage_layers(num_layers, spp, s)`: a contiguous
  slice, the first `num_layers % spp` stages one layer longer.

A size-1 group has `process_group is None`; the collectives in `comm.py` are no-ops on it.
Group creation is collective: every rank creates every group, in the same order.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mnemosyne.config import ParallelConfig


@dataclass(frozen=True)
class RankCoords:
    kvp_rank: int
    spp_rank: int
    tp_rank: int


def rank_of(p: ParallelConfig, kvp_rank: int, spp_rank: int, tp_rank: int) -> int:
    return (kvp_rank * p.spp + spp_rank) * p.tp + tp_rank


def coords_of(p: ParallelConfig, rank: int) -> RankCoords:
    if not 0 <= rank < p.world_size:
        raise ValueError(f"rank {rank} outside world of size {p.world_size}")
    tp_rank = rank % p.tp
    spp_rank = (rank // p.tp) % p.spp
    kvp_rank = rank // (p.tp * p.spp)
    return RankCoords(kvp_rank, spp_rank, tp_rank)


def tp_group_ranks(p: ParallelConfig, kvp_rank: int, spp_rank: int) -> list[int]:
    return [rank_of(p, kvp_rank, spp_rank, t) for t in range(p.tp)]


def kvp_group_ranks(p: ParallelConfig, spp_rank: int, tp_rank: int) -> list[int]:
    return [rank_of(p, g, spp_rank, tp_rank) for g in range(p.kvp)]


def stage_layers(num_layers: int, spp: int, spp_rank: int) -> range:
    """Layers of stage `spp_rank`: contiguous, sizes differ by at most one (earlier stages longer)."""
    base, extra = divmod(num_layers, spp)
    start = spp_rank * base + min(spp_rank, extra)
    return range(start, start + base + (spp_rank < extra))


@dataclass(frozen=True)
class GroupHandle:
    """One process group as seen by this rank. `process_group is None` when size == 1."""

    process_group: dist.ProcessGroup | None
    ranks: tuple[int, ...]
    rank_in_group: int

    @property
    def size(self) -> int:
        return len(self.ranks)

    @classmethod
    def trivial(cls, rank: int = 0) -> GroupHandle:
        return cls(process_group=None, ranks=(rank,), rank_in_group=0)


@dataclass(frozen=True)
class ProcessGroups:
    """This rank's place in the layout and its groups (built once per worker)."""

    parallel: ParallelConfig
    rank: int
    coords: RankCoords
    tp: GroupHandle
    kvp: GroupHandle
    # Every rank (the default process group): async scheduling's decode-ahead input ids,
    # one all-reduce per plan that has decode aheads (worker/decode_ahead.py).
    world: GroupHandle
    prev_stage_rank: int | None  # world rank sending this stage its input hidden states
    next_stage_rank: int | None  # world rank this stage sends its output to
    # Two-rank groups of those pipeline links, so stage sends never queue behind other
    # collectives on the world group (None: send over the world group).
    prev_stage_group: dist.ProcessGroup | None = None
    next_stage_group: dist.ProcessGroup | None = None

    @property
    def is_first_stage(self) -> bool:
        return self.coords.spp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.coords.spp_rank == self.parallel.spp - 1

    @property
    def is_reporting_rank(self) -> bool:
        """True on the rank that reports sampled tokens for its KVP group (last stage, tp 0)."""
        return self.is_last_stage and self.coords.tp_rank == 0

    @classmethod
    def single(cls) -> ProcessGroups:
        """The layout of a single device: every group has size 1."""
        p = ParallelConfig()
        trivial = GroupHandle.trivial()
        return cls(p, 0, RankCoords(0, 0, 0), trivial, trivial, trivial, None, None)

    @classmethod
    def create(cls, parallel: ParallelConfig, rank: int) -> ProcessGroups:
        """Create every group (collective: all ranks call this after init_process_group)."""
        c = coords_of(parallel, rank)
        tp = _make_groups(
            [tp_group_ranks(parallel, g, s) for g in range(parallel.kvp) for s in range(parallel.spp)], rank
        )
        kvp = _make_groups(
            [kvp_group_ranks(parallel, s, t) for s in range(parallel.spp) for t in range(parallel.tp)], rank
        )
        world = GroupHandle(
            process_group=dist.group.WORLD if parallel.world_size > 1 else None,
            ranks=tuple(range(parallel.world_size)),
            rank_in_group=rank,
        )
        prev_rank = rank_of(parallel, c.kvp_rank, c.spp_rank - 1, c.tp_rank) if c.spp_rank > 0 else None
        next_rank = (
            rank_of(parallel, c.kvp_rank, c.spp_rank + 1, c.tp_rank)
            if c.spp_rank < parallel.spp - 1
            else None
        )
        links: dict[tuple[int, int], dist.ProcessGroup] = {}
        for g in range(parallel.kvp):
            for t in range(parallel.tp):
                for s in range(parallel.spp - 1):
                    a, b = rank_of(parallel, g, s, t), rank_of(parallel, g, s + 1, t)
                    process_group = dist.new_group([a, b])
                    if rank in (a, b):
                        links[(a, b)] = process_group
        prev_group = links.get((prev_rank, rank)) if prev_rank is not None else None
        next_group = links.get((rank, next_rank)) if next_rank is not None else None
        return cls(parallel, rank, c, tp, kvp, world, prev_rank, next_rank, prev_group, next_group)


def _make_groups(all_ranks: list[list[int]], rank: int) -> GroupHandle:
    """Create one group per rank list (all ranks, same order); return the one holding `rank`."""
    mine: GroupHandle | None = None
    for ranks in all_ranks:
        process_group = dist.new_group(ranks) if len(ranks) > 1 else None
        if rank in ranks:
            mine = GroupHandle(process_group=process_group, ranks=tuple(ranks), rank_in_group=ranks.index(rank))
    assert mine is not None, f"rank {rank} is in no group of {all_ranks}"
    return mine


def init_distributed(
    parallel: ParallelConfig, rank: int, device: torch.device, init_method: str, timeout_s: float
) -> ProcessGroups:
    """Join the world (NCCL on CUDA, gloo on CPU) and build every group of the layout."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(
        backend=backend,
        init_method=init_method,
        rank=rank,
        world_size=parallel.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        **kwargs,
    )
    return ProcessGroups.create(parallel, rank)
