"""The prefill lane in the simulator (simulator/lane.py): the engine's LaneDriver on the
virtual clock, the 8B shape's mixed scenario scaled down (32 decodes, then a 128K-token
prompt) on the H200 roofline; config.json only."""

from __future__ import annotations

import json

import pytest
from test_simulator import LLAMA3_8B, write_config, write_trace

from mnemosyne.cli import main
from mnemosyne.engine.args import EngineArgs
from mnemosyne.latency.composition import GroupLoad, StepComposition
from mnemosyne.simulator.engine import SimulatedEngine, run_trace
from mnemosyne.simulator.lane import LANE_CHUNK_BUSY, LANE_CHUNK_IDLE
from mnemosyne.simulator.setup import device_spec, latency_model_for, simulated_engine_config
from mnemosyne.simulator.trace import TraceRequest
from mnemosyne.wire.plan import ChunkPlan, StepPlan

LONG_LEN = 131072
TRACE = [TraceRequest(0.0, 1000, 600) for _ in range(32)] + [TraceRequest(1.0, LONG_LEN, 1)]


@pytest.fixture(scope="module")
def model_8b(tmp_path_factory):
    return write_config(tmp_path_factory.mktemp("shapes"), "llama3_8b", LLAMA3_8B)


def run_lane(model_dir, trace: list[TraceRequest], max_model_len: int, free_sms: int = 16) -> SimulatedEngine:
    """The trace simulated on the H200 roofline, LARS with adaptive chunks and the lane."""
    args = EngineArgs(
        model=str(model_dir), max_model_len=max_model_len, chunk_policy="adaptive", scheduling_policy="lars",
        tbt_slo_ms=30, enable_prefix_caching=False, prefill_lane_free_sms=free_sms,
    )  # fmt: skip
    spec = device_spec("h200")
    config = simulated_engine_config(model_dir, args, spec)
    engine = SimulatedEngine(config, *latency_model_for(config, spec), gpu=spec)
    run_trace(engine, trace)
    return engine


def run(model_dir, free_sms: int) -> SimulatedEngine:
    return run_lane(model_dir, TRACE, LONG_LEN + 8, free_sms)


def gaps_during_long_prefill(engine: SimulatedEngine) -> list[float]:
    long = engine.requests[f"req-{len(TRACE) - 1}"]
    first = long.token_times_s[0]
    return [
        b - a
        for rid, sim in engine.requests.items()
        if sim is not long
        for a, b in zip(sim.token_times_s, sim.token_times_s[1:], strict=False)
        if long.arrival_s <= a and b <= first
    ]


def test_the_lane_runs_the_prompt_and_keeps_the_steps_within_the_target(model_8b):
    """The prompt's chunks run one after the other in the lane, its first token follows the
    last within a few steps, the decodes' steps beside them fit the target, and the run is
    deterministic. (Which of lane and mixed batching is faster depends on the latency model:
    the H200 roofline is optimistic for small chunks; benchmarks/simulate_mixed.py compares
    the lane with a measured profile against its H200 runs.)"""
    engine = run(model_8b, 16)
    assert engine.lane is not None and engine.virtual_lane is not None
    spans = engine.virtual_lane.spans_s
    assert len(spans) == engine.scheduler.num_lane_chunks >= 30
    assert all(a[1] <= b[0] + 1e-12 for a, b in zip(spans, spans[1:], strict=False))  # one lane
    assert {s for _, _, s in spans} <= {16, 24, 32}
    assert sum(engine.lane.num_chunks_by_steps_sms.values()) == len(spans)
    long = engine.requests[f"req-{len(TRACE) - 1}"]
    assert 0 < long.token_times_s[0] - spans[-1][1] < 0.1
    gaps = gaps_during_long_prefill(engine)
    assert gaps and max(gaps) <= 0.030  # every step beside a chunk fits its split's prediction
    assert all(len(sim.token_times_s) == sim.output_len for sim in engine.requests.values())
    again = run(model_8b, 16)
    assert [s.token_times_s for s in again.requests.values()] == [
        s.token_times_s for s in engine.requests.values()
    ]


def test_a_chunk_takes_its_time_alone_over_its_share_of_the_sms_and_longer_beside_steps(model_8b):
    spec = device_spec("h200")
    args = EngineArgs(
        model=str(model_8b), max_model_len=LONG_LEN, prefill_lane_free_sms=16, enable_prefix_caching=False
    )
    config = simulated_engine_config(model_8b, args, spec)
    engine = SimulatedEngine(config, *latency_model_for(config, spec), gpu=spec)
    lane = engine.virtual_lane
    assert lane is not None
    plan = StepPlan(step_id=0, chunks=(ChunkPlan("r", 8192, 4096, False, (), (), 0, ()),))
    alone = lane.model.step_time_s(StepComposition.single(GroupLoad().plus_chunk(4096, 8192)))
    work = lane.work_s(plan, 24)
    assert work == pytest.approx(alone * 132 / 108 * LANE_CHUNK_IDLE)
    lane.submit_lane(plan, 24)
    lane.submit_lane(plan, 16)  # after the first: one lane
    assert lane.next_end_s == pytest.approx(work)  # no step beside it
    slow = LANE_CHUNK_BUSY / LANE_CHUNK_IDLE
    lane.note_step(0.25 * work, 0.5 * work)  # a quarter of its time with a step beside it
    assert lane.next_end_s == pytest.approx(work + 0.25 * work * (1 - 1 / slow))
    lane.note_step(0.9 * work, 10 * work)  # a step to past its end: the rest at the busy rate
    end = 0.9 * work + (0.1 * work + 0.25 * work * (1 - 1 / slow)) * slow
    assert lane.next_end_s == pytest.approx(end)
    assert lane.lane_result(0.0) is None  # the clock has not moved
    engine.now_s = end
    assert lane.lane_result(0.0) is not None
    assert lane.spans_s == [(0.0, pytest.approx(end), 24)]
    second = lane.work_s(plan, 16)  # the second starts at the first's end, under the same step
    assert lane.next_end_s == pytest.approx(end + second * slow)
    engine.now_s = 1e3
    assert lane.lane_result(0.0) is not None and lane.spans_s[1][0] == pytest.approx(end)
    # a prompt's last, shorter chunk runs padded to the lane's 4096 rows: its row-wise work is
    # that of 4096 rows, its attention that of its own 663
    last = StepPlan(step_id=1, chunks=(ChunkPlan("r", 88736, 663, False, (), (), 0, ()),))
    time_of = lambda c, p: lane.model.step_time_s(StepComposition.single(GroupLoad().plus_chunk(c, p)))  # noqa: E731
    padded = time_of(663, 88736) + time_of(4096, 0) - time_of(663, 0)
    assert lane.work_s(last, 16) == pytest.approx(padded * 132 / 116 * LANE_CHUNK_IDLE)
    assert time_of(663, 88736) < padded < time_of(4096, 88736)


def test_simulating_the_lane_needs_a_gpu_with_sms(model_8b, tmp_path, capsys):
    out = tmp_path / "sim.json"
    trace = write_trace(tmp_path / "trace.jsonl")
    argv = ["simulate", "--model", str(model_8b), "--trace", str(trace), "--out", str(out),
            "--max-model-len", "16384", "--prefill-lane-free-sms", "16", "--prefill-lane-min-tokens", "4096"]  # fmt: skip
    assert main([*argv, "--gpu", "cpu", "--kv-cache-memory-gb", "4"]) != 0
    assert "SM count" in capsys.readouterr().err
    assert main(argv) == 0
    setup = json.loads(out.read_text())["setup"]
    assert setup["prefill_lane"]["steps_sms_choices"] == [16, 24, 32]
    assert sum(setup["prefill_lane"]["chunks_by_steps_sms"].values()) >= 1


def test_a_second_long_prompt_queues_and_the_lane_holds_for_the_first_ones_decodes(model_8b):
    """Two 300K-token prompts: the second waits for the lane (its lane chunks start after the
    first's last), and while the first decodes over 300K keys, which no split can serve within
    the target but every SM can, the lane holds: every one of its token gaps fits the target."""
    long_len = 300_000
    trace = [TraceRequest(0.0, 1000, 400) for _ in range(4)]
    trace += [TraceRequest(0.5, long_len, 24), TraceRequest(1.0, long_len, 1)]
    engine = run_lane(model_8b, trace, long_len + 32)
    first, second = engine.requests["req-4"], engine.requests["req-5"]
    assert len(first.token_times_s) == 24 and len(second.token_times_s) == 1
    gaps = [b - a for a, b in zip(first.token_times_s, first.token_times_s[1:], strict=False)]
    assert max(gaps) <= 0.030  # the lane held: its decodes had every SM
    spans = engine.virtual_lane.spans_s
    t0, t1 = first.token_times_s[1], first.token_times_s[-1]
    assert not [span for span in spans if t0 <= span[0] < t1]  # no chunk launched while it decoded
    # the second queued: only the first's chunks until the first's prompt was done
    before = [span for span in spans if span[1] <= first.token_times_s[0]]
    assert len(before) >= (long_len - 8448) // 4096 and len(spans) > len(before)
    assert second.token_times_s[0] > t1


def test_a_request_arriving_while_only_the_lane_runs_starts_before_the_chunk_ends(model_8b):
    """Nothing but a lane chunk in flight: the clock moves to the next arrival, not past it to
    the chunk's end (the engine's loop takes a new request at once)."""
    trace = [TraceRequest(0.0, 200_000, 1), TraceRequest(20.0, 1000, 4)]
    engine = run_lane(model_8b, trace, 200_032)
    short = engine.requests["req-1"]
    (chunk,) = [s for s in engine.virtual_lane.spans_s if s[0] <= short.arrival_s < s[1]]
    assert chunk[1] - short.arrival_s > 0.1  # arrived early in a chunk of a few hundred ms
    assert short.token_times_s[0] < chunk[1]  # its prefill ran beside that chunk
