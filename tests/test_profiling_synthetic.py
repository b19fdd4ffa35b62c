"""The profiler's synthetic block tables: one run per piece, or scattered (no run), same blocks."""

from __future__ import annotations

import json

from mnemosyne.cli import main
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


def test_cpu_profile_scattered_and_pipelined(tiny_model_dir, tmp_path):
    """Both measurement options end to end on a tiny model (two steps in flight: the planner
    retires a request only once its step's result is in)."""
    model_dir = tiny_model_dir("llama")
    out = tmp_path / "profile.json"
    assert main(["profile", "--model", str(model_dir), "--device", "cpu", "--dtype", "float32", "--grid", "tiny",
                 "--kv-cache-memory-gb", "0.002", "--block-size", "4", "--block-layout", "scattered",
                 "--step-timing", "pipelined", "--no-cache", "--out", str(out)]) == 0  # fmt: skip
    body = json.loads(out.read_text())
    assert (body["format"], body["block_layout"], body["step_timing"]) == (2, "scattered", "pipelined")
    assert body["samples"] and all(s["measured_s"] > 0 for s in body["samples"])
    assert "chunk_attention" not in body["model"]  # CPU: the reference backend, no kernel term


def test_default_step_timing_is_the_engines_own():
    """Profiles time steps as the engine runs them: two in flight with async scheduling
    (one device), else one (the H200 comparison is in benchmarks/results/README.md)."""
    from types import SimpleNamespace

    from mnemosyne.profiling.profiler import StepTiming, default_step_timing

    def config(async_scheduling: bool) -> SimpleNamespace:
        return SimpleNamespace(scheduler=SimpleNamespace(async_scheduling=async_scheduling))

    assert default_step_timing(config(True)) is StepTiming.PIPELINED
    assert default_step_timing(config(False)) is StepTiming.SERIAL


def test_cli_profile_times_steps_as_the_engine_runs_them(tiny_model_dir, tmp_path):
    """Without --step-timing the profile is timed the engine's way: pipelined on one device
    (async scheduling)."""
    out = tmp_path / "profile.json"
    assert main(["profile", "--model", str(tiny_model_dir("llama")), "--device", "cpu", "--dtype", "float32",
                 "--grid", "tiny", "--kv-cache-memory-gb", "0.002", "--block-size", "4", "--no-cache",
                 "--out", str(out)]) == 0  # fmt: skip
    assert json.loads(out.read_text())["step_timing"] == "pipelined"
