"""The profiler's synthetic block tables: one run per piece, or scattered (no run), same blocks."""

from __future__ import annotations

from mnemosyne.layers.attention.metadata import leading_run
from mnemosyne.profiling.synthetic import BlockLayout, SyntheticPlanner, SyntheticSeq


def _block_ids(layout: BlockLayout) -> list[tuple[int, ...]]:
    planner = SyntheticPlanner(16, (1000,), None, layout)
    plan = planner.plan([SyntheticSeq(32, 1000), SyntheticSeq(1, 200)])
    return [c.pieces[0].new_block_ids for c in plan.chunks]


def test_contiguous_is_one_run_and_scattered_has_none():
    contiguous, scattered = _block_ids(BlockLayout.CONTIGUOUS), _block_ids(BlockLayout.SCATTERED)
    for run_ids, scattered_ids in zip(contiguous, scattered, strict=True):
        assert leading_run(list(run_ids)) == (run_ids[0], len(run_ids))
        assert sorted(scattered_ids) == list(run_ids)  # the same blocks, the same KV bytes
        assert leading_run(list(scattered_ids))[1] == 1
    assert len(contiguous[0]) == -(-1032 // 16)
