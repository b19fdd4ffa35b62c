"""Batch description for attention over the paged KV cache.

One entry per sequence of the (sub-)batch a device runs. Query tokens of all
sequences are packed along dim 0; sequence i owns rows
[query_start_loc[i], query_start_loc[i+1]).

Global positions, for sequence i (KV range held on this device)::

    keys held here:   kv_start[i] ....................... kv_start[i] + kv_lens[i]
    queries:                         q_pos_start[i] .. q_pos_start[i] + query_lens[i]

    query at global position p sees key at global position t  iff  t <= p
                                      (and p - t < sliding_window, when set)

Keys of sequence i live in its block table: key kv_start[i] + j is in slot
block_tables[i, j // B] * B + j % B of this device's cache (B = block_size).
The new K/V of packed query row r go to slot_mapping[r] (-1: not written here;
under KV-cache parallelism only the newest group writes).

Invariants: for a single-device run, kv_start == 0 and
kv_lens == q_pos_start + query_lens (the new keys are written before attention).
Under KVP, a group holding an older piece of a request has kv_start = piece start,
kv_lens = piece length (all keys before the queries) and slot_mapping -1 for the
request's rows; `kvp_merge` says which rows are merged across groups.

`block_runs_cpu[i] = (b0, n)`: the first n blocks of sequence i are b0, b0+1, ..., b0+n-1
(the block pool keeps a growing request's blocks one run where it can: `kv_cache/block_pool.py`).
Keys [kv_start, kv_start + n*B) are then one strided view of the cache, which dense
kernels read without a gather. `backend_plan` is what the attention backend derived
from the host lists once per step (`KernelBackend.plan`), shared by every layer.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mnemosyne.layers.attention.kvp_merge import KVPMergeIndex


@dataclass
class AttentionMetadata:
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32, cumulative query lengths
    q_pos_start: torch.Tensor  # [num_seqs] int64, global position of each sequence's first query
    kv_start: torch.Tensor  # [num_seqs] int64, global position of the first key held here
    kv_lens: torch.Tensor  # [num_seqs] int32, number of keys held here (after this step's write)
    block_tables: torch.Tensor  # [num_seqs, max_num_blocks] int32, padded with 0
    slot_mapping: torch.Tensor  # [num_tokens] int64, -1 = do not write
    # Host copies of the per-sequence lengths (avoid device syncs in Python loops).
    query_lens_cpu: list[int]
    q_pos_start_cpu: list[int]
    kv_start_cpu: list[int]
    kv_lens_cpu: list[int]
    max_query_len: int
    max_kv_len: int
    kvp_merge: KVPMergeIndex | None = None  # rows merged across KVP groups (None: none)
    block_runs_cpu: list[tuple[int, int]] | None = None  # per seq: (first block id, leading run length)
    backend_plan: object | None = None  # the backend's per-step plan: set by its first layer's call
    # (KernelBackend.forward), or once per graph by DecodeGraphs

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens_cpu)

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        q_pos_start: list[int],
        kv_start: list[int],
        kv_lens: list[int],
        block_tables: list[list[int]] | list[torch.Tensor],  # per sequence: ids, or an int32 tensor
        # (CPU, or on `device`)
        slot_mapping: list[int],
        device: torch.device | str,
        kvp_merge: KVPMergeIndex | None = None,
        block_runs: list[tuple[int, int]] | None = None,
    ) -> AttentionMetadata:
        """The host lists go to `device` in two copies (one int64 buffer, with the block-table
        lengths when the tables are on `device`, and one int32 buffer; pinned and asynchronous
        on CUDA), the tensors being views of those buffers."""
        device = torch.device(device)
        num_seqs = len(query_lens)
        tables = [
            b if isinstance(b, torch.Tensor) else torch.tensor(b, dtype=torch.int32) for b in block_tables
        ]
        table_lens = [b.shape[0] for b in tables]
        max_blocks = max(table_lens, default=0)
        on = next((b.device for b in tables if b.device.type != "cpu"), torch.device("cpu"))
        with_lens = on.type != "cpu" and on == device  # the lengths travel with the int64 lists
        q_pos_d, kv_start_d, slots_d, lens_d = to_device_packed(
            (q_pos_start, kv_start, slot_mapping, table_lens if with_lens else ()), torch.int64, device
        )
        if on.type != "cpu":
            bt = _pad_on_device(tables, max(max_blocks, 1), on, lens_d if with_lens else None)
        elif max_blocks:
            bt = torch.nn.utils.rnn.pad_sequence(tables, batch_first=True).to(torch.int32)  # 0-padded
        else:
            bt = torch.zeros((num_seqs, 1), dtype=torch.int32)
        qsl = list(itertools.accumulate(query_lens, initial=0))  # [num_seqs + 1]
        qsl_d, kv_lens_d = to_device_packed((qsl, kv_lens), torch.int32, device)
        return cls(
            query_start_loc=qsl_d,
            q_pos_start=q_pos_d,
            kv_start=kv_start_d,
            kv_lens=kv_lens_d,
            block_tables=bt.to(device),
            slot_mapping=slots_d,
            query_lens_cpu=list(query_lens),
            q_pos_start_cpu=list(q_pos_start),
            kv_start_cpu=list(kv_start),
            kv_lens_cpu=list(kv_lens),
            max_query_len=max(query_lens, default=0),
            max_kv_len=max(kv_lens, default=0),
            kvp_merge=kvp_merge,
            block_runs_cpu=block_runs
            if block_runs is not None
            else [leading_run(b.tolist()) for b in tables],
        )


def to_device_packed(
    lists: Sequence[Sequence[int]], dtype: torch.dtype, device: torch.device
) -> list[torch.Tensor]:
    """One 1-D tensor per list, on `device`: views of one buffer filled by one host copy,
    from pinned memory and asynchronous (in stream order) on CUDA. The caching host
    allocator keeps the pinned buffer until the copy has run.

    Every view starts 16-byte aligned (each list is padded to 16 bytes in the buffer):
    Triton compiles a kernel variant per pointer alignment, so an alignment that followed
    the batch's lengths would compile new variants while serving (tests/test_no_recompile.py)."""
    per_16 = max(1, 16 // dtype.itemsize)
    sizes = [-(-len(x) // per_16) * per_16 for x in lists]
    flat: list[int] = []
    for x, size in zip(lists, sizes, strict=True):
        flat.extend(x)
        flat.extend([0] * (size - len(x)))
    pinned = device.type == "cuda"
    host = torch.tensor(flat, dtype=dtype, pin_memory=pinned)  # [sum of padded lengths]
    packed = host.to(device, non_blocking=pinned)
    return [view[: len(x)] for view, x in zip(packed.split(sizes), lists, strict=True)]


def _pad_on_device(
    tables: list[torch.Tensor], width: int, device: torch.device, lens_d: torch.Tensor | None = None
) -> torch.Tensor:
    """[num_seqs, width] int32 on `device`, row i = tables[i] (on `device`) padded with 0, in a
    fixed number of launches: one concatenation and one scatter (rows and columns from the
    lengths on the device: `lens_d` [num_seqs] int64 when the caller sent them already).
    Host work: O(num_seqs), not O(blocks)."""
    lens = [t.shape[0] for t in tables]
    total = sum(lens)
    bt = torch.zeros((len(tables), width), dtype=torch.int32, device=device)
    if total == 0:
        return bt
    flat = torch.cat([t for t, n in zip(tables, lens, strict=True) if n])  # [total]
    if lens_d is None:
        (lens_d,) = to_device_packed((lens,), torch.long, device)
    rows = torch.repeat_interleave(torch.arange(len(tables), device=device), lens_d, output_size=total)
    starts = torch.cumsum(lens_d, 0) - lens_d  # [num_seqs] first flat index of each row
    cols = torch.arange(total, device=device) - starts[rows]
    bt[rows, cols] = flat
    return bt


def leading_run(block_ids: list[int], known: int = 0) -> tuple[int, int]:
    """(b0, n): the first n ids are b0, b0+1, ..., b0+n-1; `known` ids are already known to be."""
    if not block_ids:
        return 0, 0
    b0, n = block_ids[0], max(known, 1)
    while n < len(block_ids) and block_ids[n] == b0 + n:
        n += 1
    return b0, n
