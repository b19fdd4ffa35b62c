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
