"""benchmarks/latency_validation.py times held-out steps as the profile timed its own (the GPU
run is the lead's)."""

from __future__ import annotations

import json

from benchmarks.latency_validation import profile_timing
from mnemosyne.profiling.profiler import StepTiming
from mnemosyne.profiling.synthetic import BlockLayout


def test_profile_timing_follows_the_profile_file(tmp_path):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"step_timing": "pipelined", "block_layout": "scattered"}))
    assert profile_timing(str(path), StepTiming.SERIAL) == (StepTiming.PIPELINED, BlockLayout.SCATTERED)
    path.write_text(json.dumps({"step_timing": "serial"}))
    assert profile_timing(str(path), StepTiming.PIPELINED) == (StepTiming.SERIAL, BlockLayout.CONTIGUOUS)
    path.write_text(json.dumps({}))  # a profile from before these fields: the engine's own timing
    assert profile_timing(str(path), StepTiming.PIPELINED) == (StepTiming.PIPELINED, BlockLayout.CONTIGUOUS)


def test_profile_timing_of_the_roofline_is_the_engines():
    assert profile_timing("roofline", StepTiming.SERIAL) == (StepTiming.SERIAL, BlockLayout.CONTIGUOUS)
