"""A worker's mirror of the block tables of the requests that hold KV on its KVP group.

The driver's `KVCacheManager` is the source of truth; each plan carries only the
block ids appended since the last plan (`PiecePlan.new_block_ids`). On group g::

    driver:   request r, piece on group g:  token_start = S, block_ids = [b0 b1 ... bn]
    worker:   mirror[r] = MirroredPiece(token_start=S, block_ids=[b0 b1 ... bn])

    key at global position t (S <= t < token_end) sits in slot
        block_ids[(t - S) // B] * B + (t - S) % B          (B = block_size; `kv_cache.pieces.slot_of`)

The ids live twice: a Python list (slots, leading runs) and an int32 tensor on the
worker's device, grown by capacity doubling, to which each plan copies only its new
ids. A step's block table is then built from device tensors (`AttentionMetadata.build`):
its host work does not grow with the context.

Invariant (checked on every update): before appending, the mirror holds exactly
`num_known_blocks` ids and starts at the same token as the driver's piece; a
mismatch means a lost or reordered plan and raises at once instead of reading
another request's keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mnemosyne.kv_cache.block_pool import KVCacheIntegrityError
from mnemosyne.kv_cache.pieces import slots_of
from mnemosyne.layers.attention.metadata import leading_run, to_device_packed
from mnemosyne.wire.plan import PiecePlan

_CPU = torch.device("cpu")


@dataclass
class MirroredPiece:
    token_start: int
    block_ids: list[int] = field(default_factory=list)
    run: tuple[int, int] = (0, 0)  # block_ids[:n] == [b0, b0+1, ..., b0+n-1], kept up to date on append
    device: torch.device = _CPU
    # The same ids as an int32 tensor on `device` (capacity doubling): a plan copies only
    # its new ids; a step reads a 1M-token request's 64K ids without touching them on the host.
    _array: torch.Tensor | None = None
    _table: torch.Tensor | None = None  # the view `table()` returns, until the next append

    def slots(self, start: int, end: int, block_size: int) -> list[int]:
        """The cache slots of global tokens [start, end)."""
        return slots_of(self.block_ids, self.token_start, start, end, block_size)

    def append(self, new_ids: list[int]) -> None:
        n0, n1 = len(self.block_ids), len(self.block_ids) + len(new_ids)
        if self._array is None or n1 > self._array.numel():
            cap = max(n1, 16 if self._array is None else 2 * self._array.numel())
            grown = torch.empty(cap, dtype=torch.int32, device=self.device)
            if self._array is not None:
                grown[:n0] = self._array[:n0]
            self._array = grown
        if new_ids:  # (the array only grows with new ids)
            (ids,) = to_device_packed((new_ids,), torch.int32, self.device)
            self._array[n0:n1] = ids
            self._table = None
        self.block_ids.extend(new_ids)
        if new_ids and self.run[1] == n0:  # the run reached the old end: extend it, O(new ids)
            self.run = leading_run(self.block_ids, known=n0)

    def table(self) -> torch.Tensor:
        """[num_blocks] int32 on `device`, a view of the block ids."""
        if self._table is None:
            if self._array is None:
                return torch.empty(0, dtype=torch.int32, device=self.device)
            self._table = self._array[: len(self.block_ids)]
        return self._table


class BlockTableMirror:
    def __init__(self, group: int, num_blocks: int, device: torch.device = _CPU) -> None:
        self.group = group
        self.num_blocks = num_blocks
        self.device = device
        self._pieces: dict[str, MirroredPiece] = {}

    def drop(self, request_id: str) -> None:
        self._pieces.pop(request_id, None)

    def update(self, request_id: str, spec: PiecePlan) -> MirroredPiece:
        """Apply one piece update of this group; returns the mirrored piece."""
        if spec.group != self.group:
            raise ValueError(f"piece of group {spec.group} sent to the mirror of group {self.group}")
        piece = self._pieces.get(request_id)
        if piece is None:
            piece = self._pieces[request_id] = MirroredPiece(spec.token_start, device=self.device)
        if piece.token_start != spec.token_start or len(piece.block_ids) != spec.num_known_blocks:
            raise KVCacheIntegrityError(
                f"group {self.group}, request {request_id!r}: mirror starts at {piece.token_start} with "
                f"{len(piece.block_ids)} blocks, driver says {spec.token_start} with {spec.num_known_blocks}"
            )
        bad = [b for b in spec.new_block_ids if not 0 <= b < self.num_blocks]
        if bad:
            raise KVCacheIntegrityError(
                f"group {self.group}: block ids {bad[:4]} outside [0, {self.num_blocks})"
            )
        piece.append(spec.new_block_ids)
        return piece

    def get(self, request_id: str) -> MirroredPiece:
        return self._pieces[request_id]

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._pieces

    def __len__(self) -> int:
        return len(self._pieces)
