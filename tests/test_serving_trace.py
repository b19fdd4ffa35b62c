"""The serving-trace benchmark (benchmarks/serving_trace.py) end to end on CPU: a tiny model, a
3-second trace, two configurations, each on a real `mnemosyne serve` subprocess replayed by
`mnemosyne bench serve`. Checks the trace and the written JSON / PNG, never timings."""

from __future__ import annotations

import gzip
import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from tiny_models import build_tiny_model

from benchmarks.compare_serving_trace import measured_short_gaps_s, paired_ttft, rank_in
from benchmarks.serve_gpu import write_tokenizer
from benchmarks.serving_trace import main
from benchmarks.serving_trace_data import TraceSpec, analyze, make_trace, trace_id
from benchmarks.serving_trace_server import _wait_logging

TRACE_ARGS = (
    *("--duration-s", "3", "--rate", "3", "--long-fraction", "0.3", "--seed", "1"),
    *("--short-prompt", "16,48", "--short-output", "3,6"),
    *("--min-long-prompt", "200", "--max-long-prompt", "400", "--long-output", "3"),
)


def test_make_trace_seeded_mix() -> None:
    spec = TraceSpec(60.0, 2.0, 0.1, (1024, 4096), (128, 512), (65536, 131072), (128, 128), seed=3)
    trace = make_trace(spec)
    assert trace == make_trace(spec) and trace_id(spec, trace) == trace_id(spec, make_trace(spec))
    arrivals = [t["arrival_s"] for t in trace]
    assert arrivals == sorted(arrivals) and 0 <= arrivals[0] and arrivals[-1] < 60.0
    longs = [t for t in trace if t["kind"] == "long"]
    assert len(longs) == round(0.1 * len(trace)) >= 1
    assert all(65536 <= t["prompt_len"] <= 131072 and t["output_len"] == 128 for t in longs)
    shorts = [t for t in trace if t["kind"] == "short"]
    assert all(1024 <= t["prompt_len"] <= 4096 and 128 <= t["output_len"] <= 512 for t in shorts)
    assert spec.max_total_len == 131072 + 128


def test_analyze_metrics_per_kind() -> None:
    trace = [
        {"arrival_s": 0.0, "kind": "short", "prompt_len": 4, "output_len": 3},
        {"arrival_s": 0.5, "kind": "long", "prompt_len": 9, "output_len": 2},
        {"arrival_s": 1.0, "kind": "short", "prompt_len": 5, "output_len": 3},
        {"arrival_s": 1.5, "kind": "long", "prompt_len": 8, "output_len": 2},
    ]
    deadlines = [(0.1, 0.5), (2.0, 3.0), (0.1, 0.5), (2.0, 3.0)]  # (floor, deadline) seconds

    def rec(n: int, ttft: float, itl: list[float], ok: bool = True) -> dict:
        return {"prompt_len": n, "ttft_s": ttft, "itl_s": itl, "success": ok, "e2e_s": 9.0, "error": ""}

    bench = {
        "requests": [
            rec(4, 0.2, [0.01, 0.05]),  # short: in time; one gap over 30 ms
            rec(9, 4.0, [0.02]),  # long: late (4 s > 3 s), 2x its floor
            rec(5, 0.4, [0.02, 0.02]),  # short: in time
            rec(8, 0.0, [], ok=False),  # long: no first token (a miss)
        ],
        "summary": {"duration_s": 10.0, "completed": 3, "failed": 1, "request_throughput": 0.3,
                    "output_throughput": 0.7, "total_token_throughput": 2.5},
    }  # fmt: skip
    res = analyze(trace, deadlines, {"config": "x", "bench": bench}, tbt_slo_ms=30.0)
    assert res["ttft"]["short"]["n"] == 2 and res["ttft"]["short"]["p50_ms"] == pytest.approx(300.0)
    assert res["ttft"]["long"]["n"] == 1 and res["ttft"]["long"]["no_first_token"] == 1
    assert res["ttft"]["long"]["over_floor"] == [pytest.approx(2.0), None]
    assert res["slo"]["ttft_within_deadline_short"] == 1.0 and res["slo"]["ttft_within_deadline_long"] == 0.0
    assert res["slo"]["ttft_within_deadline_all"] == 0.5
    assert res["tbt"]["short"]["n"] == 4 and res["tbt"]["all"]["n"] == 5
    assert res["slo"]["tbt_within_slo_short"] == 0.75 and res["slo"]["tbt_within_slo_all"] == 0.8
    assert res["tbt"]["all"]["max_ms"] == pytest.approx(50.0)
    assert [r["ttft_s"] for r in res["requests"]] == [0.2, 4.0, 0.4, None]


def test_serving_trace_end_to_end_cpu(tmp_path: Path) -> None:
    model_dir = build_tiny_model("llama", tmp_path)  # vocab 320: room for the pool text's 236 words
    write_tokenizer(model_dir, vocab_size=320, eos_id=319)
    out = tmp_path / "out"
    common = ("--model-dir", str(model_dir), "--out", str(out), *TRACE_ARGS)
    dry = main([*common, "--dry-run"])
    lines = [json.loads(x) for x in (out / "trace.jsonl").read_text().splitlines()]
    assert len(lines) == dry["trace"]["num_requests"] >= 3 and dry["trace"]["num_long"] >= 1
    assert all({"prompt", "output_len", "arrival_s", "kind"} <= set(x) for x in lines)
    assert all(max(x["prompt"]) < 320 for x in lines)

    res = main([
        *common, "--configs", "fcfs_fixed512,lars_adaptive", "--dtype", "float32", "--device", "cpu",
        "--max-num-batched-tokens", "256", "--warmup-prompts", "0", "--request-timeout-s", "60",
    ])  # fmt: skip
    written = json.loads((out / "serving_trace.json").read_text())
    assert written["trace_id"] == res["trace_id"] == dry["trace_id"]
    assert (out / "serving_trace.png").stat().st_size > 0
    assert {"command", "device", "date", "libraries", "trace_spec", "server_flags", "ttft_deadline"} <= set(
        written
    )
    assert written["device"] == "cpu" and "serving_trace" in written["command"]
    assert written["floors"]["long_prefill_s"] and written["floors"]["decode_step_s_16_short"] > 0
    assert set(written["results"]) == {"fcfs_fixed512", "lars_adaptive"}
    n = dry["trace"]["num_requests"]
    for name, r in written["results"].items():
        assert r["server_exit_code"] == 0, name
        assert r["throughput"]["completed"] == n and r["throughput"]["total_token_throughput"] > 0
        for kind in ("short", "long"):
            assert {"p50_ms", "p99_ms"} <= set(r["ttft"][kind]) and r["ttft"][kind]["failed"] == 0
            assert 0.0 <= r["slo"][f"ttft_within_deadline_{kind}"] <= 1.0
        assert {"p50_ms", "p99_ms"} <= set(r["tbt"]["short"]) and {"p50_ms", "p99_ms"} <= set(r["tbt"]["all"])
        assert 0.0 <= r["slo"]["tbt_within_slo_all"] <= 1.0
        assert len(r["ttft"]["long"]["over_floor"]) == dry["trace"]["num_long"]
        assert len(r["requests"]) == n and all(q["deadline_s"] >= 0.5 for q in r["requests"])
        assert any(k.startswith("mnemosyne:tbt_slo_total") for k in r["server_metrics"])
    (out / "serving_trace.json").unlink()
    again = main([*common, "--combine-only"])  # rebuilt from OUT/runs alone: no server
    assert again["results"] == written["results"] and again["device"] == "cpu"


def test_simulated_serving_trace_cpu(tmp_path: Path) -> None:
    """benchmarks/simulate_serving_trace.py: the same trace through `mnemosyne simulate` per config
    (1B shape, roofline), analysed like a GPU run and labelled SIMULATED; the same bytes twice."""
    from benchmarks.simulate_serving_trace import main as simulate_main

    out = tmp_path / "sim.json"
    args = ["--out-json", str(out), "--plot", str(tmp_path / "sim.png"), "--shape", "1b", *TRACE_ARGS]
    combined = simulate_main(args)
    assert "SIMULATED" in combined["device"] and combined["SIMULATED"]
    assert set(combined["results"]) == {"fcfs_fixed512", "fcfs_fixed2048", "lars_adaptive"}
    for res in combined["results"].values():
        assert res["ttft"]["short"]["n"] + res["ttft"]["long"]["n"] == combined["trace"]["num_requests"]
        assert 0.0 <= res["slo"]["tbt_within_slo_all"] <= 1.0 and res["throughput"]["failed"] == 0
        assert res["simulation"]["setup"]["latency_model"] == "roofline NVIDIA H200"
    assert (tmp_path / "sim.png").stat().st_size > 0
    first = json.loads(out.read_text())
    simulate_main(args)
    second = json.loads(out.read_text())
    for d in (first, second):
        d.pop("date")
        for res in d["results"].values():
            res["simulation"].pop("wall_s")
    assert first == second


def test_simulated_serving_trace_on_a_layout(tmp_path: Path) -> None:
    """--layout: the same trace simulated on spp2 x kvp2 (four GPUs), the layout in its setup."""
    from benchmarks.simulate_serving_trace import main as simulate_main

    out = tmp_path / "sim.json"
    args = ["--out-json", str(out), "--layout", "spp2xkvp2", "--shape", "1b", *TRACE_ARGS]
    combined = simulate_main([*args, "--configs", "lars_adaptive"])
    res = combined["results"]["lars_adaptive"]
    layout = res["simulation"]["setup"]["layout"]
    assert (layout["tp"], layout["spp"], layout["kvp"]) == (1, 2, 2)
    assert "--spp=2" in res["simulation"]["setup"]["command"]
    assert res["ttft"]["short"]["n"] + res["ttft"]["long"]["n"] == combined["trace"]["num_requests"]


def test_long_ttft_decomposition_adds_up(tmp_path: Path) -> None:
    """benchmarks/probes/long_ttft_decomposition.py: each long request's steps with decodes,
    alone and without it add up to its simulated TTFT, and its chunks to its prompt."""
    from benchmarks.probes.long_ttft_decomposition import main as decomposition_main

    out = tmp_path / "d.json"
    res = decomposition_main(["--out", str(out), "--shape", "1b", *TRACE_ARGS])
    assert res["requests"] and json.loads(out.read_text())["requests"] == res["requests"]
    for r in res["requests"]:
        parts = r["with_decodes_s"] + r["prefill_only_s"] + r["not_scheduled_s"]
        assert parts == pytest.approx(r["ttft_s"], rel=1e-6)
        assert r["with_decodes_tokens"] + r["prefill_only_tokens"] == r["prompt_tokens"]
        assert r["prefill_floor_s"] > 0


def test_paired_ttft_compares_request_by_request() -> None:
    def req(kind: str, arrival: float, ttft: float, deadline: float = 0.5) -> dict:
        return {"kind": kind, "arrival_s": arrival, "prompt_len": 100, "success": True, "ttft_s": ttft,
                "deadline_s": deadline}  # fmt: skip

    measured = [req("short", 0.0, 0.1), req("short", 1.0, 0.8), req("short", 2.0, 0.2), req("long", 3.0, 40.0, 30.0)]
    simulated = [req("short", 0.0, 0.1), req("short", 1.0, 0.4), req("short", 2.0, 0.3), req("long", 3.0, 44.0, 30.0)]
    pairs = paired_ttft(measured, simulated)
    assert pairs["short"]["n"] == 3 and pairs["short"]["median_abs_rel_error"] == pytest.approx(0.5)
    assert pairs["short"]["p90_abs_rel_error"] == pytest.approx(0.5)  # errors 0, 0.5, 0.5
    assert pairs["short"]["deadline_agreement"] == pytest.approx(2 / 3)  # 0.8 s missed, 0.4 s met
    assert pairs["long"] == {"n": 1, "median_abs_rel_error": pytest.approx(0.1), "p90_abs_rel_error": pytest.approx(0.1),
                             "deadline_agreement": 1.0}  # fmt: skip
    with pytest.raises(SystemExit, match="not the same trace"):
        paired_ttft(measured, simulated[:3] + [req("long", 9.0, 44.0)])


def test_measured_short_gaps_and_rank(tmp_path: Path) -> None:
    requests = [{"kind": "short", "prompt_len": 10}, {"kind": "long", "prompt_len": 900}, {"kind": "short", "prompt_len": 20}]
    records = [{"prompt_len": 10, "itl_s": [0.03, 0.01]}, {"prompt_len": 900, "itl_s": [0.5]},
               {"prompt_len": 20, "itl_s": [0.02, 0.04]}]  # fmt: skip
    measured = tmp_path / "serving_trace.json"
    assert measured_short_gaps_s(measured, "cfg", requests) is None  # no bench records beside it
    (tmp_path / "runs").mkdir()
    with gzip.open(tmp_path / "runs" / "cfg.bench.json.gz", "wt") as f:
        json.dump({"requests": records}, f)
    gaps = measured_short_gaps_s(measured, "cfg", requests)
    assert gaps == [0.01, 0.02, 0.03, 0.04]  # the long request's gap left out, sorted
    assert rank_in(gaps, 0.02) == 0.5 and rank_in(gaps, 0.025) == 0.5 and rank_in(gaps, 0.005) == 0.0
    with pytest.raises(SystemExit, match="not the measured run"):
        measured_short_gaps_s(measured, "cfg", requests[:2] + [{"kind": "short", "prompt_len": 21}])


def test_an_interrupted_wait_lets_the_client_write_what_it_measured(tmp_path) -> None:
    """A time limit's signal while the trace runs: the client gets SIGTERM and time to write its
    partial results (`bench serve` does, mnemosyne/bench/serve.py) before the interrupt goes on."""
    done = tmp_path / "partial.json"
    child = (
        "import signal, sys, time, pathlib\n"
        f"def stop(*_): pathlib.Path({str(done)!r}).write_text('{{}}'); sys.exit(1)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    log = tmp_path / "server.log"
    log.write_text("")
    timer = threading.Timer(0.3, lambda: signal.raise_signal(signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            _wait_logging(proc, "trace", 120.0, log)
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
    assert done.exists() and proc.returncode == 1
