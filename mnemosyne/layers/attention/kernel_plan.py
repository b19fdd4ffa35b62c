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
class KernelPlan:
    """Which kernel runs which sequence of one step (shared by every layer)."""

    decode_seq_ids: torch.Tensor | None = None  # [num_decode] int32
    split_budget: int = 1  # work items of the decode kernel, for the whole batch
    tile_seq: torch.Tensor | None = None  # [num_tiles] int32, Triton prefill tiles
    tile_q_offset: torch.Tensor | None = None  # [num_tiles] int32
    block_q: int = 16
    chunk_splits: int = 1  # key splits of the Triton chunk kernel (at most; see min_split_keys)
    min_split_keys: int = 0  # fewest keys per split: shorter sequences use fewer of the splits
    merge_rows: torch.Tensor | None = None  # [num_tiled_rows] int32, packed rows of the tiles (splits > 1)
    page_tiles: bool = False  # the tiles walk page-aligned steps (chunk_tma_attention)
    dense: list[DenseChunk] = field(default_factory=list)


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
