"""benchmarks/simulate_mixed.py's comparison: the measured side without host stalls, and the
relative errors against the 10% bar (pure functions; the simulation itself is test_simulator's)."""

from __future__ import annotations

import pytest

from benchmarks.simulate_mixed import compare, measured_sides


def test_measured_side_without_stalls() -> None:
    timeline = [[0.03 * (i + 1), 0.03] for i in range(99)] + [[10.0, 4.8]]  # one 4.8 s stall
    run = {"long_ttft_s": 10.0, "short_tbt": {"n": 100, "p50_ms": 30.0, "p99_ms": 4800.0, "max_ms": 4800.0},
           "tbt_timeline": timeline}  # fmt: skip
    sides = measured_sides(run, stall_threshold_s=1.0)
    assert sides["all_gaps"]["max_ms"] == 4800.0 and sides["all_gaps"]["long_ttft_s"] == 10.0
    kept = sides["excluding_stalls"]
    assert kept["num_stalls"] == 1 and kept["n"] == 99 and kept["max_ms"] == pytest.approx(30.0)
    assert kept["long_ttft_s"] == pytest.approx(10.0 - (4.8 - 0.03))  # the stall's excess over the median gap


def test_compare_relative_errors() -> None:
    sim = {"long_ttft_s": 105.0, "short_tbt": {"p50_ms": 24.0, "p99_ms": 40.0, "max_ms": 41.0}}
    meas = {"long_ttft_s": 100.0, "p50_ms": 30.0, "p99_ms": 40.0, "max_ms": 0.0}
    out = compare(sim, meas, tolerance=0.10)
    assert out["long_ttft_s"]["rel_error"] == pytest.approx(0.05) and out["long_ttft_s"]["within"]
    assert out["p50_ms"]["rel_error"] == pytest.approx(-0.2) and not out["p50_ms"]["within"]
    assert out["p99_ms"]["rel_error"] == 0.0
    assert "max_ms" not in out  # no measured value to compare with
