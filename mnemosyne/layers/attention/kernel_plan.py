"""The kernel backend's per-step plan types and the Triton chunk kernel's tunables.

`HostPlan` is built from the metadata's host lists alone (`KernelBackend.host_plan`);
`KernelPlan` is its device form, built once per step and read by every layer (or filled
into fixed-shape buffers for a CUDA graph, `static_plan.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mnemosyne.kernels.cudnn_prefill import DenseChunk


@dataclass
class TileGroup:
    """One launch of the Triton chunk kernel over some of the tiled sequences (host lists;
    `tile_groups.py` says when a step's tiles take more than one)."""

    tile_seq: list[int]
    tile_q_offset: list[int]
    rows: list[int]  # packed rows of its sequences: the split merge's when splits > 1
    splits: int


@dataclass
class TileLaunch:
    """`TileGroup` on the device."""

    tile_seq: torch.Tensor  # [num_tiles] int32
    tile_q_offset: torch.Tensor  # [num_tiles] int32
    merge_rows: torch.Tensor | None  # [num_rows] int32 when splits > 1
    splits: int


@dataclass
class KernelPlan:
    """Which kernel runs which sequence of one step (shared by every layer)."""

    decode_seq_ids: torch.Tensor | None = None  # [num_decode] int32
    split_budget: int = 1  # work items of the decode kernel, for the whole batch
    # the step runs on a few SMs (a green context beside a prefill lane chunk; set by the
    # graphs captured there): the decode kernel's launch options for it (`launch_options`)
    decode_confined: bool = False
    tile_seq: torch.Tensor | None = None  # [num_tiles] int32, Triton prefill tiles
    tile_q_offset: torch.Tensor | None = None  # [num_tiles] int32
    block_q: int = 16
    chunk_splits: int = 1  # key splits of the Triton chunk kernel (at most; see min_split_keys)
    min_split_keys: int = 0  # fewest keys per split: shorter sequences use fewer of the splits
    merge_rows: torch.Tensor | None = None  # [num_tiled_rows] int32, packed rows of the tiles (splits > 1)
    page_tiles: bool = False  # the tiles walk page-aligned steps (chunk_tma_attention)
    dense: list[DenseChunk] = field(default_factory=list)
    # Several launches instead of the one above (tile_seq is then None); `tile_groups.py`
    tile_launches: list[TileLaunch] = field(default_factory=list)


def chunk_launches(plan: KernelPlan) -> list[TileLaunch]:
    """The Triton chunk kernel's launches of a step: its tile launches, else one over its
    tiles (none without tiles)."""
    if plan.tile_launches:
        return plan.tile_launches
    if plan.tile_seq is None or plan.tile_q_offset is None:
        return []
    return [TileLaunch(plan.tile_seq, plan.tile_q_offset, plan.merge_rows, plan.chunk_splits)]


@dataclass
class HostPlan:
    """`KernelPlan`'s host lists: which sequences (indices into the batch) go to which kernel."""

    block_q: int
    page_tiles: bool
    decode: list[int] = field(default_factory=list)  # query_len == 1
    dense: list[DenseChunk] = field(default_factory=list)  # cuDNN
    tile_seq: list[int] = field(default_factory=list)  # Triton chunk kernel: its query tiles
    tile_q_offset: list[int] = field(default_factory=list)
    tiled_rows: list[int] = field(default_factory=list)  # packed rows of the tiled sequences
    chunk_splits: int = 1
    min_split_keys: int = 0
    # The eager plan's launches when the tiles above split into several (`tile_groups.py`);
    # empty: one launch over them at chunk_splits. A CUDA graph's plan keeps one launch.
    groups: list[TileGroup] = field(default_factory=list)


@dataclass(frozen=True)
class ChunkKernelConfig:
    """Tunables of the Triton chunk kernel; None = the kernel's defaults."""

    block_n: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    waves: int | None = None  # programs per SM the split count aims at
    min_split_keys: int | None = None  # fewest keys per split; None: MIN_SPLIT_KEYS on CUDA, 64 on
    # CPU (the interpreter: tests reach the split path with short contexts)
    max_splits: int | None = None  # None: MAX_SPLITS, or PAGE_TILES_MAX_SPLITS for page-aligned tiles
