"""A SIMULATED serving trace beside the measured one: per config and metric, (simulated -
measured) / measured. Runs on CPU (the simulation is `benchmarks.simulate_serving_trace`).

    python -m benchmarks.compare_serving_trace --measured MEASURED/serving_trace.json \
        --latency-profile P --out OUT.json [--kv-cache-memory-gb G] [--device-latency-profile D]

--latency-profile: the profile the measured server ran with (its policies predict by it);
--device-latency-profile: where the simulated device's step times come from (default: P);
--device-step-log STEPLOG: or how a measured run's steps departed from P, by kind of step
(`mnemosyne/simulator/device_log.py`), with --arrival-delay-ms for the time outside the
engine's steps (`benchmarks.ttft_decomposition`).

The trace options (shape, duration, rate, longest prompt, configs) are taken from the
measured run's first command, so the simulated trace is the measured one (same `trace_id`,
checked). Metrics: TTFT p50/p99 of short and long requests, TBT p50/p99 of short requests,
TBT <= target fraction, output throughput.

Paired, request by request (the same trace on both sides): the median and p90 of |simulated /
measured - 1| of each request's TTFT, short and long apart, and the share of requests whose
TTFT meets its deadline on both sides or misses it on both. Percentiles of a bimodal
distribution are fragile: short TTFTs under load are fast (no long prefill running) or wait
0.4-1 s, so their median falls between the modes and moves far with one request; the
pairs say whether the simulator gives each request the wait it got.

TBT percentiles, by rank: where the measured run's bench records lie beside its JSON
(runs/CONFIG.bench.json[.gz], as `benchmarks.serving_trace` writes them), each simulated TBT
percentile is also placed in the measured gaps of short requests: the share of them at or
below it (0.50 for a p50 that is right, 0.99 for a p99). Short requests' gaps fall in two
modes, decode-only steps and steps beside a long prompt's chunk, and a percentile in the
valley between them moves far on a small share of gaps; the rank reads the error as that share.
"""

from __future__ import annotations

import argparse
import bisect
import json
import shlex
import tempfile
from pathlib import Path

from benchmarks import simulate_serving_trace
from benchmarks.serving_trace_data import read_bench
from mnemosyne.simulator.command import add_step_factor_args, step_factor_argv

TRACE_FLAGS = ("--shape", "--duration-s", "--rate", "--max-long-prompt", "--seed")
METRICS = {
    "ttft_short_p50_ms": ("ttft", "short", "p50_ms"),
    "ttft_short_p99_ms": ("ttft", "short", "p99_ms"),
    "ttft_long_p50_ms": ("ttft", "long", "p50_ms"),
    "ttft_long_p99_ms": ("ttft", "long", "p99_ms"),
    "tbt_short_p50_ms": ("tbt", "short", "p50_ms"),
    "tbt_short_p99_ms": ("tbt", "short", "p99_ms"),
    "tbt_within_slo_short": ("slo", "tbt_within_slo_short"),
    "output_throughput": ("throughput", "output_throughput"),
}


def trace_argv(measured: dict) -> list[str]:
    """The trace-defining flags of the measured run's first command."""
    words = shlex.split(measured["command"][0] if isinstance(measured["command"], list) else measured["command"])
    out = []
    for i, w in enumerate(words):
        if w in TRACE_FLAGS:
            out += [w, words[i + 1]]
    return out


def pick(res: dict, path: tuple[str, ...]) -> float | None:
    for k in path:
        res = res.get(k) if isinstance(res, dict) else None
    return res if isinstance(res, (int, float)) else None


def paired_ttft(measured: list[dict], simulated: list[dict]) -> dict:
    """Per kind of request: n, median and p90 of |sim / meas - 1| of TTFT, and the share
    whose deadline is met on both sides or missed on both (requests that succeeded on both)."""
    if [(r["arrival_s"], r["prompt_len"]) for r in measured] != [(r["arrival_s"], r["prompt_len"]) for r in simulated]:
        raise SystemExit("the measured and simulated requests are not the same trace")
    out = {}
    for kind in ("short", "long"):
        pairs = [
            (m, s) for m, s in zip(measured, simulated, strict=True)
            if m["kind"] == kind and m["success"] and s["success"] and m["ttft_s"] > 0
        ]  # fmt: skip
        if not pairs:
            continue
        errs = sorted(abs(s["ttft_s"] / m["ttft_s"] - 1) for m, s in pairs)
        agree = sum((m["ttft_s"] <= m["deadline_s"]) == (s["ttft_s"] <= s["deadline_s"]) for m, s in pairs)
        out[kind] = {
            "n": len(pairs), "median_abs_rel_error": errs[len(errs) // 2],
            "p90_abs_rel_error": errs[min(len(errs) - 1, int(0.9 * len(errs)))],
            "deadline_agreement": agree / len(pairs),
        }  # fmt: skip
    return out


def measured_short_gaps_s(measured_file: Path, config: str, requests: list[dict]) -> list[float] | None:
    """The sorted gaps of the short requests of one measured config, from its bench records
    beside the measured JSON; None when they are not there."""
    path = measured_file.parent / "runs" / f"{config}.bench.json"
    if not (path.exists() or path.with_name(path.name + ".gz").exists()):
        return None
    records = read_bench(path)["requests"]
    if [r["prompt_len"] for r in records] != [r["prompt_len"] for r in requests]:
        raise SystemExit(f"{path}: the bench records are not the measured run's requests")
    return sorted(g for r, q in zip(records, requests, strict=True) if q["kind"] == "short" for g in r["itl_s"])


def rank_in(sorted_values: list[float], value: float) -> float:
    """The share of sorted_values at or below value."""
    return bisect.bisect_right(sorted_values, value) / len(sorted_values)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--measured", required=True)
    p.add_argument("--latency-profile", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--kv-cache-memory-gb", default="102")
    p.add_argument("--device-latency-profile", default=None)
    add_step_factor_args(p)  # from another run's step log
    ns = p.parse_args(argv)
    measured = json.loads(Path(ns.measured).read_text())
    configs = sorted(measured["results"])
    with tempfile.TemporaryDirectory() as tmp:
        sim = simulate_serving_trace.main([
            *trace_argv(measured), "--latency-profile", ns.latency_profile, "--configs", ",".join(configs),
            "--kv-cache-memory-gb", ns.kv_cache_memory_gb, "--out-json", str(Path(tmp) / "sim.json"),
            *(["--device-latency-profile", ns.device_latency_profile] if ns.device_latency_profile else []),
            *step_factor_argv(ns),
        ])  # fmt: skip
    if sim["trace_id"] != measured["trace_id"]:
        raise SystemExit(f"simulated trace {sim['trace_id']} is not the measured {measured['trace_id']}")
    rows = {}
    for name in configs:
        rows[name] = {}
        for metric, path in METRICS.items():
            m, s = pick(measured["results"][name], path), pick(sim["results"][name], path)
            rel = None if m in (None, 0) or s is None else (s - m) / m
            rows[name][metric] = {"measured": m, "simulated": s, "rel_error": rel}
        print(name, {k: (None if v["rel_error"] is None else f"{100 * v['rel_error']:+.1f}%") for k, v in rows[name].items()})  # fmt: skip
        gaps_s = measured_short_gaps_s(Path(ns.measured), name, measured["results"][name]["requests"])
        if gaps_s:
            for metric in ("tbt_short_p50_ms", "tbt_short_p99_ms"):
                s = rows[name][metric]["simulated"]
                rows[name][metric]["measured_rank_of_simulated"] = None if s is None else rank_in(gaps_s, s / 1e3)
            print(name, "simulated TBT p50 / p99 at measured ranks", rows[name]["tbt_short_p50_ms"].get("measured_rank_of_simulated"),
                  rows[name]["tbt_short_p99_ms"].get("measured_rank_of_simulated"))  # fmt: skip
        pairs = paired_ttft(measured["results"][name]["requests"], sim["results"][name]["requests"])
        rows[name]["paired_ttft"] = pairs
        print(name, "paired TTFT", json.dumps(pairs))
    out = {
        "SIMULATED": "simulated side: `mnemosyne simulate` on CPU; measured side: the --measured H200 run",
        "command": "python -m benchmarks.compare_serving_trace " + shlex.join(argv or []),
        "measured_file": ns.measured,
        "latency_profile": ns.latency_profile,
        "device_latency_profile": ns.device_latency_profile or ns.latency_profile,
        "chunk_step_factor": ns.chunk_step_factor,
        "idle_step_factor": ns.idle_step_factor,
        "device_step_log": ns.device_step_log,
        "device_seed": ns.device_seed,
        "arrival_delay_ms": ns.arrival_delay_ms,
        "trace_id": sim["trace_id"],
        "simulate_commands": sim["simulate_commands"],
        "simulated_vs_measured": rows,
    }
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
