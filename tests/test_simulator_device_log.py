"""The simulated device of a serving step log (`simulator/device_log.py`, `mnemosyne simulate
--device-step-log`), the arrival delay (`--arrival-delay-ms`), and the TTFT decomposition
that measures it (`benchmarks/ttft_decomposition.py`). Fake step logs and a fake profile
(2 ms + 1 us per token), so every expected time is arithmetic."""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
from pathlib import Path

import pytest
from test_simulator import LLAMA32_1B, simulate, write_config, write_fake_profile

from benchmarks.ttft_decomposition import chain, measured_rows
from mnemosyne.cli import main
from mnemosyne.latency.composition import GroupLoad, StepComposition
from mnemosyne.latency.shape import Layout
from mnemosyne.simulator.command import add_step_factor_args, step_factor_argv
from mnemosyne.simulator.device_log import (
    MIXED_GRAPH_TOKENS,
    PIECEWISE_TOKENS,
    DeviceLog,
    LoggedDevice,
    composition_prefix_bucket,
    step_path,
)

STEP_S = 2e-3  # the fake profile's fixed cost per step


@pytest.fixture(scope="module")
def model_1b(tmp_path_factory) -> Path:
    return write_config(tmp_path_factory.mktemp("shapes"), "llama32_1b", LLAMA32_1B)


def logged(ratio: float, seqs: list[list[int]], **extra) -> dict:
    return {"t_s": 0.0, "measured_s": ratio * 0.01, "predicted_s": 0.01, "host_s": 0.0, "seqs": seqs, **extra}


def fake_steps() -> list[dict]:
    """Chunk steps under 4K keys at 1.5x, past 8K keys (bucket 2) at 0.8x, two lone steps at
    64K keys (too few for a bucket), idle-start steps at 3x, decode-only steps at 1.0-1.9x,
    and a stall (20x, dropped)."""
    steps = [logged(1.5, [[1, 100], [256, 0]]) for _ in range(9)]
    steps += [logged(0.8 + 0.001 * i, [[512, 9000]]) for i in range(11)]
    steps += [logged(5.0, [[64, 70000]]) for _ in range(2)]
    steps += [logged(3.0, [[2048, 0]], idle_start=True) for _ in range(8)]
    steps += [logged(1.0 + 0.1 * i, [[1, 500], [1, 900]]) for i in range(10)]
    return [*steps, logged(20.0, [[1, 500]])]


def test_device_log_takes_medians_by_prefix_bucket_and_the_decode_spread():
    log = DeviceLog.from_steps(fake_steps())
    assert log.chunk_factors == {0: 1.5, 2: pytest.approx(0.805)}  # bucket 5 (64K) has 2 steps: left out
    assert (
        log.chunk_factor(5) == log.chunk_factors[2] and log.chunk_factor(1) == 1.5
    )  # nearest; the lower on a tie
    assert log.idle_factor == 3.0 and log.num_idle_steps == 8
    assert log.decode_ratios == {
        1: tuple(pytest.approx(1.0 + 0.1 * i) for i in range(10))
    }  # the stall dropped
    assert (
        log.decode_quantile(0.5, num_decodes=3) == log.decode_quantile(0.5) == pytest.approx(1.45)
    )  # nearest
    # A log written before `idle_start`: the steps without host_s are the idle ones
    old = [{k: v for k, v in s.items() if k != "idle_start"} | ({"host_s": None} if s.get("idle_start") else {})
           for s in fake_steps()]  # fmt: skip
    assert DeviceLog.from_steps(old).idle_factor == 3.0
    few_idle = DeviceLog.from_steps(fake_steps()[:25])  # 3 idle-start steps
    assert few_idle.num_idle_steps == 3 and few_idle.idle_factor is None  # they take the chunk factors


def test_chunk_factors_follow_the_path_a_step_takes_by_its_size():
    """Under 4K keys: 300-token steps (a mixed-step graph) at 1.0x, 800-token steps (piecewise)
    at 1.2x, three 2000-token steps (eager: too few for their own median) at 2.0x, which take
    the bucket's median over every path."""
    steps = [logged(1.0, [[1, 50], [300, 0]]) for _ in range(8)] + [logged(1.2, [[800, 0]]) for _ in range(8)]
    steps += [logged(2.0, [[2000, 0]]) for _ in range(3)]
    log = DeviceLog.from_steps(steps)
    assert log.path_factors == {(0, "mixed_graph"): 1.0, (0, "piecewise"): 1.2} and log.chunk_factors == {
        0: 1.2
    }
    device = LoggedDevice(log)
    for tokens, want in ((300, 1.0), (512, 1.0), (513, 1.2), (1024, 1.2), (2000, 1.2)):
        comp = StepComposition.single(GroupLoad().plus_chunk(tokens, 0))
        assert device.ratio(comp, idle=False) == pytest.approx(want), tokens
    assert [step_path(n) for n in (512, 513, 1024, 1025)] == [
        "mixed_graph",
        "piecewise",
        "piecewise",
        "eager",
    ]


def test_chunk_factors_follow_the_chunk_size_in_steps_with_decodes():
    """After 200K keys, beside decodes: 32-token chunks at 1.0x, 64-token at 1.2x, three
    128-token steps (too few: the bucket and path's median); prompt-only 64-token steps at
    2.0x count towards that median but get no size factor (their logged times are split
    unevenly between neighbours)."""
    steps = [logged(1.0, [[1, 500], [32, 200_000]]) for _ in range(8)]
    steps += [logged(1.2, [[1, 500], [64, 200_000]]) for _ in range(8)]
    steps += [logged(1.1, [[1, 500], [128, 200_000]]) for _ in range(3)]
    steps += [logged(2.0, [[64, 200_000]]) for _ in range(9)]
    log = DeviceLog.from_steps(steps)
    bucket = composition_prefix_bucket(StepComposition.single(GroupLoad().plus_chunk(32, 200_000)))
    medians = {k: statistics.median(r) for k, r in log.size_ratios.items()}
    assert medians == {(bucket, "mixed_graph", 0): 1.0, (bucket, "mixed_graph", 1): 1.2}
    assert log.path_factors == {(bucket, "mixed_graph"): pytest.approx(1.2)}
    device = LoggedDevice(log)
    for decodes, tokens, want in ((1, 32, 1.0), (1, 64, 1.2), (1, 128, 1.2), (0, 32, 1.2), (0, 64, 1.2)):
        load = GroupLoad().plus_decode(501) if decodes else GroupLoad()
        comp = StepComposition.single(load.plus_chunk(tokens, 200_000))
        assert device.ratio(comp, idle=False) == pytest.approx(want), (decodes, tokens)


def test_steps_with_a_chunk_beside_decodes_take_their_keys_spread_in_a_fixed_order():
    """Ten 64-token steps after 200K keys beside decodes at 1.00-1.45x: the simulated steps of
    that key take those ratios at the golden-ratio sequence's quantiles (the first at the
    median), so any 32 of them in a row span the spread (the calibration's 0.98 quantile sees
    its top), the same order for every seed; a prompt-only step of that size takes the
    median of its bucket and path."""
    steps = [logged(1.0 + 0.05 * i, [[1, 500], [64, 200_000]]) for i in range(10)]
    log = DeviceLog.from_steps(steps)
    bucket = composition_prefix_bucket(StepComposition.single(GroupLoad().plus_chunk(64, 200_000)))
    assert log.size_ratios == {
        (bucket, "mixed_graph", 1): tuple(pytest.approx(1.0 + 0.05 * i) for i in range(10))
    }
    beside = StepComposition.single(GroupLoad().plus_decode(501).plus_chunk(64, 200_000))
    device, other = LoggedDevice(log, seed=0), LoggedDevice(log, seed=7)
    ratios = [device.ratio(beside, idle=False) for _ in range(96)]
    assert ratios == [other.ratio(beside, idle=False) for _ in range(96)]  # no seed
    assert ratios[0] == pytest.approx(1.225)  # q = 0.5
    for k in range(0, 64, 8):
        window = sorted(ratios[k : k + 32])
        assert window[0] < 1.05 and window[-2] > 1.38, k
    assert statistics.mean(ratios) == pytest.approx(1.225, abs=0.01)
    alone = StepComposition.single(GroupLoad().plus_chunk(64, 200_000))
    assert device.ratio(alone, idle=False) == pytest.approx(1.225)


def test_path_sizes_are_the_workers():
    from mnemosyne.layers.attention.static_plan import MAX_SPLIT_GRAPH_TOKENS
    from mnemosyne.worker.mixed_graph import MAX_MIXED_GRAPH_TOKENS
    from mnemosyne.worker.piecewise_graph import MAX_PIECEWISE_TOKENS

    assert (MIXED_GRAPH_TOKENS, PIECEWISE_TOKENS) == (MAX_SPLIT_GRAPH_TOKENS, MAX_PIECEWISE_TOKENS)
    assert MAX_MIXED_GRAPH_TOKENS == MAX_PIECEWISE_TOKENS


def test_decode_draws_follow_the_number_of_decodes():
    """One decode at 1.0x, two or three at 2.0x (the host's work per request): each simulated
    decode-only step draws from its own bucket, eight decodes from the nearest (2-3)."""
    steps = [logged(1.0, [[1, 100]]) for _ in range(8)] + [
        logged(2.0, [[1, 100], [1, 200]]) for _ in range(8)
    ]
    steps += [logged(5.0, [[1, 1]] * 4)] * 3  # 4-7 decodes: too few, left out
    log = DeviceLog.from_steps(steps)
    assert sorted(log.decode_ratios) == [0, 1]
    device = LoggedDevice(log)
    load = GroupLoad()
    for n, want in ((1, 1.0), (2, 2.0), (3, 2.0), (8, 2.0)):
        load_n = load
        for _ in range(n):
            load_n = load_n.plus_decode(300)
        assert device.ratio(StepComposition.single(load_n), idle=False) == pytest.approx(want)


def test_logged_device_times_each_kind_of_step():
    device = LoggedDevice(DeviceLog.from_steps(fake_steps()), seed=3)
    chunk = StepComposition.single(GroupLoad().plus_decode(101).plus_chunk(256, 0, sample=True))
    far = StepComposition.single(GroupLoad().plus_chunk(512, 9000))
    decode = StepComposition.single(GroupLoad().plus_decode(501))
    assert composition_prefix_bucket(far) == 2 and composition_prefix_bucket(decode) is None
    assert device.step_time_s(chunk, 0.02, idle=False) == pytest.approx(0.03)
    assert device.step_time_s(chunk, 0.02, idle=True) == pytest.approx(0.06)  # submitted onto an idle device
    assert device.step_time_s(far, 0.02, idle=True) == pytest.approx(0.06)
    assert device.step_time_s(far, 0.02, idle=False) == pytest.approx(0.0161)
    draws = [device.ratio(decode, idle=False) for _ in range(200)]
    assert 1.0 <= min(draws) < 1.1 and 1.8 < max(draws) <= 1.9 and 1.3 < statistics.median(draws) < 1.6
    again = LoggedDevice(DeviceLog.from_steps(fake_steps()), seed=3)
    assert [again.ratio(decode, idle=False) for _ in range(200)] == draws  # seeded


def write_step_log(path: Path, steps: list[dict]) -> Path:
    header = {"format": "mnemosyne-step-log-1", "device": "cuda", "layout": {"tp": 1, "spp": 1, "kvp": 1}}
    path.write_bytes(gzip.compress("\n".join(json.dumps(x) for x in [header, *steps]).encode()))
    return path


def test_simulate_with_a_device_step_log(model_1b, tmp_path):
    """A lone prompt arriving at an idle engine: its one step takes the idle factor (3x); its
    decode-only steps draw from 1.0-1.9x; the same seed gives the same bytes; the arrival delay
    adds to its TTFT; the log cannot be combined with the factors it replaces."""
    p = write_fake_profile(tmp_path / "p.json", model_1b, Layout(1, 1, 1), 1.0)
    log = write_step_log(tmp_path / "steps.jsonl.gz", [logged(1.0, [[1, 1]])] * 16 + fake_steps())
    trace = tmp_path / "one.jsonl"
    trace.write_text(json.dumps({"arrival_s": 1.0, "prompt_len": 64, "output_len": 40}) + "\n")
    base = simulate(model_1b, trace, tmp_path / "a.json", "--latency-profile", str(p))
    flags = ("--latency-profile", str(p), "--device-step-log", str(log))
    dev = simulate(model_1b, trace, tmp_path / "b.json", *flags)
    assert (
        dev["setup"]["device_step_log"]["idle_factor"] == 3.0 and dev["setup"]["device_step_log"]["seed"] == 0
    )
    assert dev["requests"][0]["ttft_s"] == pytest.approx(3 * base["requests"][0]["ttft_s"], rel=1e-6)
    gap = base["requests"][0]["tbt_p50_s"]
    assert (
        1.0 * gap <= dev["requests"][0]["tbt_p50_s"] <= 1.9 * gap
        and dev["requests"][0]["tbt_max_s"] > 1.2 * gap
    )
    again = simulate(model_1b, trace, tmp_path / "c.json", *flags)
    assert again["requests"] == dev["requests"]
    other_seed = simulate(model_1b, trace, tmp_path / "d.json", *flags, "--device-seed", "1")
    assert other_seed["requests"][0]["tbt_p50_s"] != dev["requests"][0]["tbt_p50_s"]
    late = simulate(model_1b, trace, tmp_path / "e.json", *flags, "--arrival-delay-ms", "6")
    assert late["requests"][0]["ttft_s"] == pytest.approx(dev["requests"][0]["ttft_s"] + 6e-3, rel=1e-6)
    assert late["requests"][0]["arrival_s"] == 1.0 and late["setup"]["arrival_delay_ms"] == 6.0
    out = tmp_path / "f.json"
    rc = main(["simulate", "--model", str(model_1b), "--trace", str(trace), "--out", str(out), *flags,
               "--chunk-step-factor", "1.1"])  # fmt: skip
    assert rc == 2 and not out.exists()


def test_arrival_delay_holds_a_request_back_from_the_step_planned_after_its_arrival(model_1b, tmp_path):
    """A prompt arriving while another decodes reaches the scheduler 10 ms later: its TTFT
    grows by the delay, give or take the two decode steps it may wait for either way."""
    p = write_fake_profile(tmp_path / "p.json", model_1b, Layout(1, 1, 1), 1.0)
    trace = tmp_path / "two.jsonl"
    lines = [{"arrival_s": 0.0, "prompt_len": 64, "output_len": 200},
             {"arrival_s": 0.1001, "prompt_len": 128, "output_len": 2}]  # fmt: skip
    trace.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    now = simulate(model_1b, trace, tmp_path / "a.json", "--latency-profile", str(p))
    late = simulate(
        model_1b, trace, tmp_path / "b.json", "--latency-profile", str(p), "--arrival-delay-ms", "10"
    )
    grew = late["requests"][1]["ttft_s"] - now["requests"][1]["ttft_s"]
    assert grew == pytest.approx(10e-3, abs=2 * (STEP_S + 1e-4))
    assert late["requests"][0]["ttft_s"] == pytest.approx(now["requests"][0]["ttft_s"] + 10e-3, rel=1e-6)


def test_step_factor_argv_passes_the_device_flags_on():
    ap = argparse.ArgumentParser()
    add_step_factor_args(ap)
    assert step_factor_argv(ap.parse_args([])) == []
    ns = ap.parse_args(["--device-step-log", "s.jsonl.gz", "--device-seed", "2", "--arrival-delay-ms", "6.1"])
    assert step_factor_argv(ns) == [
        "--device-step-log",
        "s.jsonl.gz",
        "--device-seed",
        "2",
        "--arrival-delay-ms",
        "6.1",
    ]


def test_ttft_decomposition_of_a_fake_run(tmp_path):
    """Two short requests: one served by one idle-start step (TTFT 30 ms, step 24 ms: 6 ms
    outside the steps), one prefilled in two chunks beside another request's decodes; the
    client's clock runs 100 s ahead of the engine's. A long prompt's chunk that ends at a
    short prompt's length before its arrival is not taken for it."""
    steps = [
        {"t_s": 1.0, "measured_s": 0.05, "predicted_s": 0.05, "host_s": None, "seqs": [[1000, 0]], "idle_start": True},
        {"t_s": 10.029, "measured_s": 0.024, "predicted_s": 0.02, "host_s": None, "seqs": [[2000, 0]],
         "idle_start": True},
        {"t_s": 10.031, "measured_s": 0.002, "predicted_s": 0.002, "host_s": 0.0, "seqs": [[1, 2000]]},
        {"t_s": 10.041, "measured_s": 0.010, "predicted_s": 0.009, "host_s": 0.0, "seqs": [[1, 2001], [600, 0]]},
        {"t_s": 10.050, "measured_s": 0.009, "predicted_s": 0.008, "host_s": 0.0, "seqs": [[1, 2002], [400, 600]]},
    ]  # fmt: skip
    run = tmp_path / "run"
    (run / "runs").mkdir(parents=True)
    write_step_log(run / "runs" / "c.steps.jsonl.gz", steps)
    trace = [{"kind": "short", "prompt_len": 2000}, {"kind": "short", "prompt_len": 1000}]
    (run / "serving_trace.json").write_text(json.dumps({"results": {"c": {"requests": trace}}}))
    bench = [  # client clock = engine + 100 s; the first token reaches the client 0.5 / 0.3 ms after the step
        {"success": True, "prompt_len": 2000, "start_time": 110.0, "ttft_s": 0.0295},
        {"success": True, "prompt_len": 1000, "start_time": 110.022, "ttft_s": 0.0283},
    ]
    (run / "runs" / "c.bench.json").write_text(json.dumps({"requests": bench}))
    assert chain(steps, 1000, after_s=0.0) == [0] and chain(steps, 1000, after_s=10.0) == [3, 4]
    rows, summary = measured_rows(run, "c")
    assert [r["i"] for r in rows] == [0, 1] and [r["num_steps"] for r in rows] == [1, 2]
    assert summary["num_outside"] == 1 and summary["outside_ms_median"] == pytest.approx(5.5)
    # the fastest delivery (request 1's, 0.3 ms) is taken as 0: request 0's is 0.2 ms, its wait 5.3 ms
    assert rows[0]["delivery_s"] == pytest.approx(0.2e-3, abs=1e-9) and rows[1][
        "delivery_s"
    ] == pytest.approx(0.0)
    assert rows[0]["wait_s"] == pytest.approx(5.3e-3) and rows[1]["span_s"] == pytest.approx(0.019)
