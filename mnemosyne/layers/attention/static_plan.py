"""Attention plans of fixed shape, for CUDA graphs of mixed steps (`worker/mixed_graph.py`).

A captured graph replays the launches it recorded: their grids, their scalar arguments and
the addresses of their tensors. So the plan of a graph of padded size T (tokens) is fixed
when it is captured, and each step writes only the *contents* of its lists::

    decode_seq_ids [T]                 the step's decodes, then -1   (decode kernel: no item, no row)
    tile_seq       [max_tiles(T, bq)]  the step's query tiles, then -1 (chunk kernels: empty tile)
    tile_q_offset  [max_tiles(T, bq)]  their first query offsets, then 0
    merge_rows     [T]                 the tiled sequences' packed rows, then -1 (split merge: skipped)

    max_tiles(T, bq) = ceil(T / bq) + EXTRA_TILES   (a step of n <= T tokens cut into tiles of
                       bq tokens has at most n / bq + (number of chunks) tiles; more: no graph)

A plan is fixed per (T, tile height bq, split count S):
- bq is one of `KernelBackend.tile_heights`: the full height, or half of it when every chunk
  of the step fits half a tile (as the eager plan picks: a short chunk over a long prefix
  would otherwise do twice its MMA work).
- S is one of `split_counts`: the most the eager plan ever picks (one tile over a long
  prefix), whatever T, since a step of many tokens may hold one short chunk among decodes;
  or 1, for steps whose eager plan takes one split (short prefixes, or tiles enough to fill
  the GPU). Split sizes follow each sequence's length on the device (`min_split_keys`): a
  short sequence fills only its first splits, the others are empty (lse -inf) and the merge
  does not read them. But every empty split is still a program per tile and KV head, and
  S > 1 writes the partials and merges them: a 992-token chunk after 64 keys took 10.1 ms on
  the S graph against 6.7 ms on the one-split graph (H200, 1B shape, both with the decode
  kernel's padding then unfixed; benchmarks/results/session16_h200_2026-11-30/). With S = 1
  the chunk kernel writes the output directly and no merge runs. Graphs over
  MAX_SPLIT_GRAPH_TOKENS hold only S = 1: a step that size whose chunks need split keys runs
  piecewise (`fits`).
Also fixed: the decode kernel's split budget (it never depends on the lengths).

All of a graph's lists are views of one int32 device buffer, written by one host copy per
step. Graphs of every size share the buffer (they never run at once).
"""

from __future__ import annotations

import torch

from mnemosyne.kernels.host_math import cdiv
from mnemosyne.layers.attention.kernel_backend import KernelBackend
from mnemosyne.layers.attention.kernel_plan import HostPlan, KernelPlan

# Tiles beyond T / block_q: room for that many more chunks' ragged last tiles. Few: every
# padding tile is a program per KV head and split that the GPU still schedules (H200, 8B,
# c = 32 after 128K: 8 of them took the chunk kernel from 169 to 285 us per layer).
EXTRA_TILES = 2

# Graphs over this many tokens hold only the one-split plan. A 992-token step whose chunk
# needs split keys ran 15-47% slower on the fixed S-split plan than eager (H200: after 4K
# keys, 1B shape, 8.6 against 5.8 ms; after 32K, 8B, 63.9 against 55.4 ms), and at that size
# the eager launches hide behind the device. With one split both take the same device time.
MAX_SPLIT_GRAPH_TOKENS = 512


class StaticPlans:
    """One `KernelPlan` per padded size, over one shared buffer (see the module docstring)."""

    def __init__(
        self,
        backend: KernelBackend,
        max_tokens: int,
        num_kv_heads: int,
        block_size: int,
        device: torch.device,
        num_sms: int | None = None,
    ) -> None:
        """num_sms: the SMs the graphs run on (a prefill lane split's few); None: every SM."""
        self.backend = backend
        self.num_kv_heads = num_kv_heads
        self.page_tiles = backend.uses_page_tiles(block_size)
        self.tile_heights = backend.tile_heights()
        self.max_tiles = self.tiles_for(max_tokens, self.tile_heights[0])
        self.max_tokens = max_tokens
        # S: the most splits the eager plan picks (one tile over a long prefix), for every size:
        # a graph's step may be one short chunk among decodes. Shorter sequences use fewer of
        # them (`min_split_keys`); an empty split writes only its LSE.
        # (A long prefix: the count is bounded by the GPU, not by the keys.)
        self.num_splits = backend.chunk_splits(1, num_kv_heads, 1 << 40, self.page_tiles, num_sms=num_sms)
        self.split_counts = sorted({1, self.num_splits})  # the graphs' split counts
        # [decode ids: max_tokens | tile_seq: max_tiles | tile_q_offset: max_tiles | merge rows: max_tokens]
        self.buffer = torch.full((2 * max_tokens + 2 * self.max_tiles,), -1, dtype=torch.int32, device=device)
        self.device = device

    def tiles_for(self, size: int, block_q: int) -> int:
        return cdiv(size, block_q) + EXTRA_TILES

    def _views(self, size: int, block_q: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        t, m, tiles = self.max_tokens, self.max_tiles, self.tiles_for(size, block_q)
        buf = self.buffer
        decode, tile_seq = buf[:size], buf[t : t + tiles]
        tile_off, rows = buf[t + m : t + m + tiles], buf[t + 2 * m : t + 2 * m + size]
        return decode, tile_seq, tile_off, rows

    def plan_for(self, size: int, block_q: int, splits: int) -> KernelPlan:
        """The fixed plan a graph of `size` tokens, tiles of `block_q` and `splits` key splits
        (one of `split_counts`) is captured with."""
        decode, tile_seq, tile_off, rows = self._views(size, block_q)
        return KernelPlan(
            decode_seq_ids=decode,
            split_budget=self.backend.decode_split_budget(self.num_kv_heads),
            tile_seq=tile_seq,
            tile_q_offset=tile_off,
            block_q=block_q,
            chunk_splits=splits,
            min_split_keys=self.backend.min_split_keys(),
            merge_rows=rows if splits > 1 else None,
            page_tiles=self.page_tiles,
        )

    def fits(self, size: int, host: HostPlan) -> bool:
        """Whether a step planned as `host` can run on the graph of (`size`, host.block_q)."""
        return (
            not host.dense
            and host.block_q in self.tile_heights
            and host.page_tiles == self.page_tiles
            and len(host.decode) <= size
            and len(host.tile_seq) <= self.tiles_for(size, host.block_q)
            and len(host.tiled_rows) <= size
            and self.splits_for(host) in self.split_counts_for(size)
        )

    def split_counts_for(self, size: int) -> list[int]:
        """The split counts of the graphs of `size` tokens."""
        return self.split_counts if size <= MAX_SPLIT_GRAPH_TOKENS else [1]

    def splits_for(self, host: HostPlan) -> int:
        """The split count of the graph that runs a step planned as `host`: 1 when the eager
        plan takes one split in every launch, else the most (`num_splits`)."""
        eager = max([host.chunk_splits, *(g.splits for g in host.groups)])
        return 1 if eager == 1 else self.num_splits

    def fill(self, size: int, host: HostPlan) -> None:
        """Write the step's lists into the graph's views, padded (one host-to-device copy)."""
        t, m = self.max_tokens, self.max_tiles
        used = t + 2 * m + size  # the buffer up to the end of this size's merge rows
        flat = [-1] * used
        flat[: len(host.decode)] = host.decode
        flat[t : t + len(host.tile_seq)] = host.tile_seq
        offsets = [0] * self.tiles_for(size, host.block_q)
        offsets[: len(host.tile_q_offset)] = host.tile_q_offset
        flat[t + m : t + m + len(offsets)] = offsets
        flat[t + 2 * m : t + 2 * m + len(host.tiled_rows)] = host.tiled_rows
        pinned = self.device.type == "cuda"
        src = torch.tensor(flat, dtype=torch.int32, pin_memory=pinned)
        self.buffer[:used].copy_(src, non_blocking=pinned)
