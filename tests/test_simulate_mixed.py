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


def test_recorded_step_errors_measure_each_step_from_the_later_of_submit_and_previous_result() -> None:
    """benchmarks/simulate_validation.py: an async engine submits step n+1 before step n's
    result, so a step's own time starts at the later of its submission and the result before."""
    import dataclasses

    from benchmarks.simulate_validation import recorded_step_errors
    from mnemosyne.latency.composition import GroupLoad

    class PerToken:  # a fake latency model: 1 ms per query token
        def step_time_s(self, composition) -> float:
            return 1e-3 * composition.groups[0].num_tokens

    decode = dataclasses.asdict(GroupLoad().plus_decode(100).plus_decode(100))  # 2 tokens
    chunk = dataclasses.asdict(GroupLoad().plus_decode(100).plus_chunk(9, 500))  # 10 tokens
    steps = [
        [0.000, 0.002, 0.0, decode],  # alone: 2 ms
        [0.001, 0.022, 0.0, chunk],  # submitted during the step before: 20 ms from 0.002
        [0.030, 0.032, 0.0, decode],  # submitted after the result before: 2 ms
    ]
    out = recorded_step_errors({"steps": steps}, {"fake": PerToken()})
    assert out["decode_only"]["num_steps"] == 2 and out["decode_only"]["measured_s"] == pytest.approx(0.004)
    assert out["decode_only"]["fake"]["ratio_p10_p50_p90"] == [1.0, 1.0, 1.0]
    assert out["with_chunk"]["measured_s"] == pytest.approx(0.020)
    assert out["with_chunk"]["fake"]["predicted_s"] == pytest.approx(0.010)
    assert out["with_chunk"]["fake"]["ratio_p10_p50_p90"] == [0.5, 0.5, 0.5]
