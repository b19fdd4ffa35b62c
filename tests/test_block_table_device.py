"""The worker's block-table mirror on the device and the per-step table built from it."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_block_tables_from_device_resident_mirrors(device):
    """Mirrors on the device (capacity grown past 16 ids) give the same padded block table
    as host lists, assembled by the device path (one concatenation and one scatter)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from mnemosyne.layers.attention.metadata import AttentionMetadata, _pad_on_device
    from mnemosyne.worker.block_table import MirroredPiece

    ids = [list(range(100, 140)), [], [7], list(range(3, 20))]
    pieces = []
    for blocks in ids:
        piece = MirroredPiece(0, device=torch.device(device))
        for k in range(0, len(blocks), 6):
            piece.append(blocks[k : k + 6])
        pieces.append(piece)
    want = AttentionMetadata.build([1] * 4, [0] * 4, [0] * 4, [1] * 4, ids, [-1] * 4, "cpu").block_tables
    got = _pad_on_device([p.table() for p in pieces], want.shape[1], torch.device(device))
    assert torch.equal(got.cpu(), want)
    if device == "cuda":  # the engine's path: tables already on the device
        meta = AttentionMetadata.build(
            [1] * 4, [0] * 4, [0] * 4, [1] * 4, [p.table() for p in pieces], [-1] * 4, device
        )
        assert torch.equal(meta.block_tables.cpu(), want)
