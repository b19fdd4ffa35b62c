"""The engine's step log (engine/step_log.py): one line per processed step whose chunks are
exactly what the scheduler ran, readable by the latency-model refit."""

from __future__ import annotations

import gzip
import json
import statistics
from pathlib import Path

import pytest
import torch
from conftest import TEST_DEVICE

from benchmarks.refit_latency_profile import load_held_out
from benchmarks.step_log_report import bucket_label, group_of, held_back_summary, lane_report
from benchmarks.step_log_report import main as step_log_report
from mnemosyne import SamplingParams
from mnemosyne.engine.args import EngineArgs
from mnemosyne.engine.llm_engine import LLMEngine
from mnemosyne.engine.step_log import STEP_LOG_FORMAT, read_step_log
from mnemosyne.layers.attention.kernel_plan import KernelPlan, TileLaunch
from mnemosyne.wire.plan import StepPath, StepTrace
from mnemosyne.worker.worker import step_trace


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_step_log_holds_every_scheduled_token(tiny_model_dir, tmp_path: Path, async_scheduling: bool):
    path = tmp_path / "steps.jsonl"
    args = EngineArgs(
        model=str(tiny_model_dir("llama")), dtype="float32", device=TEST_DEVICE, max_model_len=128,
        block_size=4, chunk_size=8, max_num_batched_tokens=32, kv_cache_memory_gb=0.001,
        async_scheduling=async_scheduling, step_log=str(path),
    )  # fmt: skip
    prompts = {"a": list(range(5, 25)), "b": list(range(30, 37))}  # 20 and 7 tokens
    num_out = 6
    with LLMEngine.from_args(args) as engine:
        for rid, ids in prompts.items():
            engine.add_request(ids, SamplingParams(temperature=0, max_tokens=num_out, ignore_eos=True), rid)
        while engine.has_unfinished_requests():
            engine.step()
    header, steps = read_step_log(path)
    assert header["format"] == STEP_LOG_FORMAT and header["layout"] == {"tp": 1, "spp": 1, "kvp": 1}
    assert header["block_size"] == 4 and header["async_scheduling"] is async_scheduling
    times = [s["t_s"] for s in steps]
    assert times == sorted(times) and all(s["measured_s"] > 0 and s["predicted_s"] > 0 for s in steps)
    # The host's time before each submission: none for the first step (the engine was idle),
    # then the time from the latest result, never negative.
    assert steps[0]["host_s"] is None
    assert all(0 <= s["wait_s"] <= s["measured_s"] + 1e-3 for s in steps)  # (the wait is inside the step)
    assert all(s["host_s"] is not None and s["host_s"] >= 0 for s in steps[max(1, len(steps) // 2) :])
    # Every token position of each request was computed once: prompt chunks of at most 8
    # tokens, then one decode per output token but the last (sampled, never fed back).
    # A stale decode ahead (async, after a request's last token) would add a position.
    positions = sorted((n, start) for s in steps for n, start in s["seqs"])
    assert all(n <= 8 for n, _ in positions)
    total = sum(n for n, _ in positions)
    want = sum(len(ids) + num_out - 1 for ids in prompts.values())
    assert want <= total <= want + (2 if async_scheduling else 0)
    gz = tmp_path / "steps.jsonl.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert read_step_log(gz) == (header, steps)  # as benchmarks/results keeps them
    held = load_held_out(str(path), skip_steps=2)
    assert held["steps"] == steps[2:]
    rep = step_log_report([str(path), "--skip-steps", "0", "--worst", "3", "--out", str(tmp_path / "r.json")])
    assert rep["num_steps"] == len(steps) and sum(g["steps"] for g in rep["groups"]) == len(steps)
    assert {g["kind"] for g in rep["groups"]} <= {"decode", "1 chunk", "2+ chunks"} and len(rep["worst"]) == 3
    host = rep["host"]
    assert host is not None and 0 <= host["p50_ms"] <= host["p99_ms"] <= host["max_ms"] and host["worst"]
    chunk_ratios = sorted(s["measured_s"] / s["predicted_s"] for s in steps if any(n > 1 for n, _ in s["seqs"]))
    assert rep["chunk_step_factor"] == pytest.approx(statistics.median(chunk_ratios))
    # Submitted with nothing in flight: the first step, and without async scheduling every step
    idle = [s for s in steps if s.get("idle_start")]
    assert steps[0].get("idle_start") is True
    assert len(idle) == len(steps) if not async_scheduling else len(idle) < len(steps) // 2
    idle_chunks = sorted(s["measured_s"] / s["predicted_s"] for s in idle if any(n > 1 for n, _ in s["seqs"]))
    assert rep["num_idle_steps"] == len(idle_chunks)
    assert rep["idle_step_factor"] == pytest.approx(statistics.median(idle_chunks) / rep["chunk_step_factor"])
    # How each step ran: eager on CPU (no graphs), the reference attention (no kernel plan)
    assert {s["path"] for s in steps} <= {p.value for p in StepPath}
    if TEST_DEVICE == "cpu":
        assert all(s["path"] == "eager" and s["cudnn_chunks"] == 0 and s["chunk_splits"] == [] for s in steps)
    assert sum(g["steps"] for g in rep["paths"]) == len(steps)


def test_step_trace_reads_the_eager_kernel_plan():
    tiles = torch.zeros(3, dtype=torch.int32)
    plan = KernelPlan(tile_seq=tiles, tile_q_offset=tiles, chunk_splits=7, dense=[object()] * 2)
    assert step_trace(StepPath.PIECEWISE, plan) == StepTrace(StepPath.PIECEWISE, 2, (7,))
    assert step_trace(StepPath.EAGER, KernelPlan(chunk_splits=7)) == StepTrace(StepPath.EAGER, 0, ())  # no tiles
    two = KernelPlan(tile_launches=[TileLaunch(tiles, tiles, None, 1), TileLaunch(tiles, tiles, tiles, 32)])
    assert step_trace(StepPath.EAGER, two) == StepTrace(StepPath.EAGER, 0, (1, 32))  # a long prefix apart
    assert step_trace(StepPath.MIXED_GRAPH, plan) == StepTrace(StepPath.MIXED_GRAPH)  # a graph's fixed plan
    assert step_trace(StepPath.EAGER, None) == StepTrace(StepPath.EAGER)  # the reference backend
    confined = step_trace(StepPath.DECODE_GRAPH, None, steps_sms=24)  # beside a prefill lane chunk
    assert confined == StepTrace(StepPath.DECODE_GRAPH, steps_sms=24)


def test_step_groups_and_prefix_buckets():
    assert group_of([[1, 900], [1, 50]]) == ("decode", 0)
    assert group_of([[1, 900], [32, 5000]]) == ("1 chunk", 1)
    assert group_of([[64, 300_000], [32, 10]]) == ("2+ chunks", 7)  # the largest prefix: 256K-512K
    assert [bucket_label(b) for b in (0, 1, 7)] == ["< 4K", "4K-8K", "256K-512K"]


def test_not_a_step_log_is_named(tmp_path: Path):
    bad = tmp_path / "profile.json"
    bad.write_text(json.dumps({"steps": []}, indent=1))
    with pytest.raises(ValueError, match="not a step log"):
        read_step_log(bad)
    assert load_held_out(str(bad), 0) == {"steps": []}  # the other held-out format


def test_held_back_steps_are_the_runs_before_a_step_read_early():
    """A run of steps over 1.3x their prediction that ends in one under 0.5x: each was read
    late behind the launch of the step after it (counted by that step's path)."""

    def step(ratio: float, path: str, cudnn: int = 0) -> dict:
        return {"measured_s": ratio * 0.02, "predicted_s": 0.02, "path": path, "cudnn_chunks": cudnn}

    steps = [step(1.0, "mixed_graph"), step(1.5, "mixed_graph"), step(1.5, "piecewise", 1),
             step(1.5, "piecewise", 1), step(0.3, "piecewise", 1), step(1.0, "decode_graph"),
             step(1.6, "decode_graph"), step(0.2, "eager"), step(0.2, "eager")]  # fmt: skip
    held = held_back_summary(steps)
    assert held == {"steps": 4, "by_next_path": {"eager": 1, "piecewise+cudnn": 3}}
    assert held_back_summary(steps[:4])["steps"] == 0  # no early read: nothing held


def test_lane_report_shows_where_the_chunks_time_went():
    """The lane chunks' timing in the report: the lane stream's share of each chunk's measured
    time, the lane thread's launching outside its waits, the chunks that allocated."""
    def chunk(t_s: float, measured_s: float, device_s: float, allocs: int) -> dict:
        timing = {"launch_s": 0.05, "paced_s": 0.04, "device_s": device_s, "num_device_allocs": allocs,
                  "num_device_frees": 0, "num_alloc_retries": 0}  # fmt: skip
        return {"t_s": t_s, "lane": True, "measured_s": measured_s, "predicted_s": 0.1, "seqs": [[4096, 0]],
                "steps_sms": 16, "lane_timing": timing}  # fmt: skip

    rep = lane_report([chunk(1.0, 0.2, 0.18, 0), chunk(2.0, 0.4, 0.2, 3)], [])
    assert rep is not None
    timing = rep["timing"]
    assert timing["device_over_measured_p50"] == pytest.approx(0.7) and timing["device_over_measured_min"] == 0.5
    assert timing["launch_active_ms_p50"] == pytest.approx(10.0)
    assert [c["t_s"] for c in timing["chunks_allocating"]] == [2.0] and timing["chunks_allocating"][0]["allocs"] == 3
