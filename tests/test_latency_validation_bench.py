"""benchmarks/latency_validation.py times held-out steps as the profile timed its own (the GPU
run is the lead's)."""

from __future__ import annotations

from benchmarks.latency_validation import profile_timing
from mnemosyne.profiling.profiler import StepTiming
from mnemosyne.profiling.synthetic import BlockLayout

PIPELINED, SERIAL, CONTIGUOUS = StepTiming.PIPELINED, StepTiming.SERIAL, BlockLayout.CONTIGUOUS


def test_profile_timing_follows_the_profiles_record():
    info = {"step_timing": "pipelined", "block_layout": "scattered", "grid": "quick"}
    assert profile_timing(info, SERIAL) == (PIPELINED, BlockLayout.SCATTERED)
    assert profile_timing({"step_timing": "serial"}, PIPELINED) == (SERIAL, CONTIGUOUS)
    # a profile from before these fields, or the roofline (no record): the engine's own timing
    assert profile_timing({"grid": "quick"}, PIPELINED) == (PIPELINED, CONTIGUOUS)
    assert profile_timing({}, SERIAL) == (SERIAL, CONTIGUOUS)


def test_chunk_steps_pipelined_cpu_smoke(tmp_path):
    """benchmarks/chunk_steps_pipelined.py end to end on the tiny shape: each cell timed both
    ways beside its floor (the H200 figures are the lead's; nothing here asserts a time)."""
    import json

    from benchmarks.chunk_steps_pipelined import main

    out = tmp_path / "csp.json"
    res = main(["--shape", "tiny-llama", "--device", "cpu", "--dtype", "float32", "--kv-cache-gb", "0.05",
                "--prefixes", "300,100000000", "--chunks", "3,16", "--repeats", "1", "--out", str(out)])  # fmt: skip
    assert json.loads(out.read_text())["steps"] == res["steps"]
    assert [r["seqs"] for r in res["steps"]] == [[[3, 300]], [[16, 300]]]  # the prefix past capacity skipped
    for r in res["steps"]:
        assert r["floor_s"] == max(r["flop_floor_s"], r["bytes_floor_s"]) > 0
        assert r["serial_s"] > 0 and r["pipelined_s"] > 0
