"""The serving trace of `benchmarks/serving_trace.py`, SIMULATED: `mnemosyne simulate` (the real
scheduler in virtual time, step times from a latency model) under each configuration, analysed
exactly as the GPU benchmark analyses a `mnemosyne bench serve` run. A prediction, not a
measurement; runs on CPU in minutes.

    python -m benchmarks.simulate_serving_trace --out-json OUT.json [--plot OUT.png] \
        [--gpu h200] [--kv-cache-memory-gb G] [--device-latency-profile D] [serving_trace options: --shape 8b --rate 0.5 \
        --duration-s 300 --latency-profile P --max-num-batched-tokens ... --configs ...]

--device-latency-profile D: the simulated device's step times come from D, while the
engine's policies predict with --latency-profile (the profile the server ran with) and
calibrate against D's times online, as the server calibrates against the GPU.

Every option other than --out-json, --plot, --gpu, --kv-cache-memory-gb, --layout and
--device-latency-profile is
`benchmarks.serving_trace`'s, with its defaults: the same trace (`serving_trace --dry-run`
writes it, seeded) and the same server flags per configuration (`CONFIGS` of
serving_trace_server: chunk policy, chunk size, scheduling policy; --max-num-batched-tokens,
--tbt-slo-ms, --deadline-factor, --min-deadline-s, --latency-profile, max-model-len = the
trace's longest request). Without --latency-profile the simulator uses the roofline of --gpu.

Each simulated request becomes the record `bench serve` would have written (TTFT, the gaps
between tokens, E2E; times from the trace's start), so TTFT p50/p99 per kind, TBT, SLO
attainment (TBT <= target; TTFT within max(factor x prefill floor, min)) and throughput come
from the benchmark's own `analyze`. The simulated engine streams one token per gap and never
fails a request; the real server adds HTTP/streaming overhead and host time per step that no
latency model holds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from benchmarks import serving_trace
from benchmarks.serving_trace_data import (
    analyze,
    floors_summary,
    make_trace,
    trace_id,
    trace_stats,
    ttft_deadlines_s,
)
from benchmarks.serving_trace_server import CONFIGS
from mnemosyne.bench.long_context.run import SHAPES, parse_layout, write_model_dir
from mnemosyne.bench.metrics import RequestRecord, summarize
from mnemosyne.cli import build_parser, parse_args
from mnemosyne.simulator.command import add_step_factor_args, run_simulation, step_factor_argv
from mnemosyne.simulator.engine import SimulatedEngine


def simulate_argv(
    ns: argparse.Namespace, own: argparse.Namespace, name: str, model_dir: Path, trace: Path, layout: str = "tp1"
) -> list[str]:
    """`mnemosyne simulate` arguments matching the server flags of `serving_trace` for config
    `name`, on `layout` (`parse_layout`: tp4, spp2xkvp2, ...)."""
    if ns.server_args:
        raise SystemExit(f"--server-args {ns.server_args!r}: not translated to `mnemosyne simulate`")
    return [
        "simulate", "--model", str(model_dir), "--trace", str(trace), "--out", str(trace.parent / f"{name}.json"),
        "--gpu", own.gpu, "--max-model-len", str(serving_trace.trace_spec(ns).max_total_len),
        "--max-num-batched-tokens", str(ns.max_num_batched_tokens), "--tbt-slo-ms", str(ns.tbt_slo_ms),
        "--prefill-only-step-ms", str(ns.prefill_only_step_ms),
        "--deadline-factor", str(ns.deadline_factor), "--min-deadline-s", str(ns.min_deadline_s),
        *(["--latency-profile", str(ns.latency_profile)] if ns.latency_profile else []),
        *(["--kv-cache-memory-gb", str(own.kv_cache_memory_gb)] if own.kv_cache_memory_gb else []),
        *(["--device-latency-profile", own.device_latency_profile] if own.device_latency_profile else []),
        *step_factor_argv(own),
        *(f"--{k}={v}" for k, v in parse_layout(layout).items()),
        *CONFIGS[name],
    ]  # fmt: skip


def bench_records(engine: SimulatedEngine, n: int) -> list[RequestRecord]:
    """What `bench serve` would have recorded for trace request i ("req-i"), times from the trace's start."""
    out = []
    for i in range(n):
        r = engine.requests[f"req-{i}"]
        t = r.token_times_s
        out.append(RequestRecord(
            success=bool(t), prompt_len=r.prompt_len, output_len=len(t), ttft_s=t[0] - r.arrival_s if t else 0.0,
            itl_s=[b - a for a, b in zip(t, t[1:], strict=False)],
            e2e_s=(r.finish_s or 0.0) - r.arrival_s, start_time=r.arrival_s,
        ))  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> dict:
    own_ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    own_ap.add_argument("--out-json", type=Path, required=True)
    own_ap.add_argument("--plot", type=Path, default=None)
    own_ap.add_argument(
        "--gpu", default="h200", help="DeviceSpec: memory, and the roofline without a profile"
    )
    own_ap.add_argument(
        "--kv-cache-memory-gb", type=float, default=None, help="KV GiB per GPU (default: the simulator's)"
    )
    own_ap.add_argument("--device-latency-profile", default=None, help="the simulated device's step times")
    own_ap.add_argument(
        "--layout", default="tp1",
        help="the simulated GPUs' layout, e.g. tp4, spp4, spp2xkvp2 (a KVP group holds its whole KV "
        "capacity before the next); give --latency-profile of its tp (transferred to its stages and groups)",
    )  # fmt: skip
    add_step_factor_args(own_ap)
    argv = list(sys.argv[1:] if argv is None else argv)
    own, rest = own_ap.parse_known_args(argv)
    with tempfile.TemporaryDirectory(prefix="sim_serving_trace_") as tmp:
        ns = serving_trace.parse_args([*rest, "--dry-run", "--out", tmp])
        serving_trace.main([*rest, "--dry-run", "--out", tmp])  # writes tmp/trace.jsonl
        spec = serving_trace.trace_spec(ns)
        trace = make_trace(spec)
        shape = serving_trace.SHAPE_NAMES[ns.shape]
        model_dir = ns.model_dir or write_model_dir(shape, Path(tmp))
        deadlines = ttft_deadlines_s(model_dir, trace, ns.deadline_factor, ns.min_deadline_s)
        results, commands = {}, {}
        for name in ns.configs:
            sim_argv = simulate_argv(ns, own, name, model_dir, Path(tmp) / "trace.jsonl", own.layout)
            wall = time.perf_counter()
            engine, sim = run_simulation(parse_args(build_parser(), sim_argv))
            wall_s = time.perf_counter() - wall
            records = bench_records(engine, len(trace))
            bench = {
                "requests": [dataclasses.asdict(r) for r in records],
                "summary": summarize(records, engine.now_s),
            }
            res = analyze(trace, deadlines, {"config": name, "bench": bench}, ns.tbt_slo_ms)
            commands[name] = "mnemosyne " + shlex.join(sim_argv).replace(tmp, "TMP")
            setup = {**sim["setup"], "model": str(model_dir).replace(tmp, "TMP"), "command": commands[name]}
            res["simulation"] = {**sim["summary"], "setup": setup, "wall_s": round(wall_s, 1)}
            results[name] = res
            print(json.dumps({"config": name, "wall_s": round(wall_s, 1), **{k: res[k] for k in ("ttft", "slo")}}), flush=True)  # fmt: skip
        floors = floors_summary(model_dir, spec, trace, [f for f, _ in deadlines])
    source = next(iter(results.values()))["simulation"]["setup"]["latency_model"] if results else None
    combined = {
        "benchmark": "serving_trace",
        "SIMULATED": "a prediction of `mnemosyne simulate` on CPU, not a measurement; no GPU ran this",
        "command": "python -m benchmarks.simulate_serving_trace " + shlex.join(argv),
        "simulate_commands": commands,
        "trace_command": "python -m benchmarks.serving_trace --dry-run --out TMP " + shlex.join(rest),
        "device": f"SIMULATED (CPU; {own.gpu} latency model: {source})",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "shape": shape,
        "model_config": SHAPES[shape],
        "trace_id": trace_id(spec, trace),
        "trace_spec": dataclasses.asdict(spec),
        "trace": trace_stats(trace),
        "configs": {name: CONFIGS[name] for name in results},
        "server_flags": {**serving_trace.server_flags(ns), "kv_cache_memory_gb": own.kv_cache_memory_gb},
        "ttft_deadline": serving_trace.ttft_deadline_text(ns),
        "floors": floors,
        "results": results,
    }
    own.out_json.parent.mkdir(parents=True, exist_ok=True)
    own.out_json.write_text(json.dumps(combined, indent=1))
    print(f"wrote {own.out_json}", flush=True)
    if own.plot:
        from benchmarks.plot_serving_trace import plot

        plot(combined, own.plot)
        print(f"wrote {own.plot}", flush=True)
    return combined


if __name__ == "__main__":
    main()
