"""The part of a StepPlan that one KVP group runs: its sub-batch.

Group g runs every chunk whose request holds keys on g (a piece with group == g
that starts before the chunk's end). For chunk c and g's piece [S, E)::

    queries:   all of c's tokens, positions [c.start, c.end)     (the same on every group)
    keys:      kv_start = S,  kv_len = min(E, c.end) - S          (this group's range only)
    writes:    slots of [c.start, c.end) if g owns c (c lies in the newest piece), else -1
    samples:   only if g owns c

Rows are packed in plan order. Shared chunks (keys on several groups) also get a
row range in the step-wide shared buffer, in plan order over *all* shared chunks,
so every group agrees on it without talking (see `layers/attention/kvp_merge.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mnemosyne.layers.attention.kvp_merge import KVPMergeIndex, merge_buffer_rows
from mnemosyne.layers.attention.metadata import AttentionMetadata, to_device_packed
from mnemosyne.wire.plan import ChunkPlan, StepPlan
from mnemosyne.worker.block_table import BlockTableMirror


@dataclass
class SubBatch:
    chunks: list[ChunkPlan]  # in plan order
    owned: list[bool]  # per chunk: this group writes its K/V and samples it
    row_starts: list[int]  # per chunk: first packed row
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    meta: AttentionMetadata
    # Decode aheads (async scheduling): their chunk indices and packed rows, whose input
    # ids are placeholders until the worker takes them from the previous plan's samples.
    decode_ahead_chunks: list[int]
    decode_ahead_rows: list[int]

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


def build_sub_batch(
    plan: StepPlan, mirror: BlockTableMirror, block_size: int, device: torch.device, pad_to: int = 0
) -> SubBatch:
    """Apply this group's block-table updates from `plan` and build its sub-batch. `pad_to`:
    at least this many rows, the rows after the chunks' padding (token 0 at position 0, no
    K/V write, in no sequence: row-wise ops keep them apart, attention never reads them)."""
    group = mirror.group
    chunks: list[ChunkPlan] = []
    owned: list[bool] = []
    row_starts: list[int] = []
    token_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    kv_start: list[int] = []
    kv_lens: list[int] = []
    block_tables: list[torch.Tensor] = []
    block_runs: list[tuple[int, int]] = []
    shared_runs: list[tuple[int, int, int]] = []  # shared chunks: (first row, first slot, tokens)
    ahead_chunks: list[int] = []
    ahead_rows: list[int] = []
    num_shared = 0
    for chunk in plan.chunks:
        shared_base = num_shared
        if chunk.is_shared:
            num_shared += chunk.num_tokens
        spec = next((p for p in chunk.pieces if p.group == group), None)
        if spec is None:
            continue
        piece = mirror.update(chunk.request_id, spec)
        is_owner = chunk.owner_group == group
        row = len(token_ids)
        if chunk.is_decode_ahead:
            ahead_chunks.append(len(chunks))
            ahead_rows.append(row)
        chunks.append(chunk)
        owned.append(is_owner)
        row_starts.append(row)
        token_ids.extend(chunk.token_ids)
        positions.extend(range(chunk.start, chunk.end))
        if is_owner:
            slots.extend(piece.slots(chunk.start, chunk.end, block_size))
        else:
            slots.extend([-1] * chunk.num_tokens)
        kv_start.append(spec.token_start)
        kv_lens.append(min(spec.token_end, chunk.end) - spec.token_start)
        block_tables.append(piece.table())
        block_runs.append(piece.run)
        if chunk.is_shared:
            shared_runs.append((row, shared_base, chunk.num_tokens))
    num_padding = max(0, pad_to - len(token_ids))
    token_ids.extend([0] * num_padding)
    positions.extend([0] * num_padding)
    slots.extend([-1] * num_padding)
    merge = None
    if num_shared:
        merge_slots = [merge_buffer_rows(num_shared) - 1] * len(token_ids)  # unshared rows: the trash slot
        for row, slot, n in shared_runs:
            merge_slots[row : row + n] = range(slot, slot + n)
        (merge_slots_d,) = to_device_packed((merge_slots,), torch.long, device)
        merge = KVPMergeIndex(num_shared_tokens=num_shared, slots=merge_slots_d)
    meta = AttentionMetadata.build(
        query_lens=[c.num_tokens for c in chunks],
        q_pos_start=[c.start for c in chunks],
        kv_start=kv_start,
        kv_lens=kv_lens,
        block_tables=block_tables,
        slot_mapping=slots,
        device=device,
        kvp_merge=merge,
        block_runs=block_runs,
    )
    input_ids, positions_d = to_device_packed((token_ids, positions), torch.long, device)
    return SubBatch(
        chunks=chunks,
        owned=owned,
        row_starts=row_starts,
        input_ids=input_ids,
        positions=positions_d,
        meta=meta,
        decode_ahead_chunks=ahead_chunks,
        decode_ahead_rows=ahead_rows,
    )
