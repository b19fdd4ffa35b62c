"""The serving-trace benchmark (benchmarks/serving_trace.py) end to end on CPU: a tiny model, a
3-second trace, two configurations, each on a real `mnemosyne serve` subprocess replayed by
`mnemosyne bench serve`. Checks the trace and the written JSON / PNG, never timings."""

from __future__ import annotations

import json
from pathlib import Path

from tiny_models import build_tiny_model

from benchmarks.serve_gpu import write_tokenizer
from benchmarks.serving_trace import main
from benchmarks.serving_trace_data import TraceSpec, make_trace, trace_id

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
