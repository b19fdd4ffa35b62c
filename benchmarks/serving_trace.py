"""A serving trace through the real server: Poisson arrivals of short and long requests,
replayed by `mnemosyne bench serve` against `mnemosyne serve` under each scheduling setup.

One H200, 8B shape (random weights), a 90-second trace (38 requests: 34 short, 4 long of
103K-123K tokens), one call of at most 10 minutes per configuration, merged on any machine:

    T="--shape 8b --duration-s 90 --rate 0.5 --max-long-prompt 131072"
    P="--latency-profile benchmarks/results/latency_profile_quick_h200_2026-11-29.json --request-timeout-s 150"
    timeout 580 python -m benchmarks.serving_trace $T $P --configs fcfs_fixed512 --out OUT1
    timeout 580 python -m benchmarks.serving_trace $T $P --configs fcfs_fixed2048 --out OUT2
    timeout 580 python -m benchmarks.serving_trace $T $P --configs lars_adaptive --out OUT3
    mkdir -p DIR/runs && cp OUT*/runs/*.json DIR/runs/
    python -m benchmarks.serving_trace $T --combine-only --out DIR    # DIR/serving_trace.json + .png

Each configuration takes its server's start-up (~30-90 s: weights, decode and piecewise CUDA
graphs), ~10 s of warm-up, the trace (90 s) plus the time its last requests need (~10-30 s,
more when long prefills lag) and ~10 s to stop: ~2.5-3.5 minutes (a request waits at most
--request-timeout-s for a byte).
`timeout`'s SIGTERM stops the server and keeps the configurations already done in OUT/runs.
The 1B shape: `--shape 1b --rate 1` (74 short, 8 long), similar times, no committed profile
(the server then uses a cached one or the roofline model). The issue's full trace is
`--duration-s 300 --max-long-prompt 524288`, at a rate the GPU can sustain: a 512K prefill
alone is ~2 minutes on the 8B shape.

    python -m benchmarks.serving_trace --dry-run --out /tmp/t        # only write the trace

The trace (seeded, `--seed`): Poisson arrivals at `--rate` requests/s over `--duration-s`
seconds; exactly round(`--long-fraction` x n) of them (at least one) are long (prompt uniform
in [`--min-long-prompt`, `--max-long-prompt`], output `--long-output`), the others short
(prompt uniform in `--short-prompt` = 1024,4096, output in `--short-output` = 128,512).
Prompts are random token ids (prefix caching is off: nothing is shared). The trace is a
JSONL file of `{"prompt": [ids], "output_len", "arrival_s", "kind"}` that `bench serve
--dataset file` replays at its own arrival times.

Configurations (`--configs`, comma-separated), each on a fresh server:

    fcfs_fixed512    --chunk-policy fixed --chunk-size 512  --scheduling-policy fcfs
    fcfs_fixed2048   --chunk-policy fixed --chunk-size 2048 --scheduling-policy fcfs
    lars_adaptive    --chunk-policy adaptive --scheduling-policy lars (space sharing included)
    fcfs_adaptive    --chunk-policy adaptive --scheduling-policy fcfs (only when named)
    lars_adaptive_lane  lars_adaptive with --prefill-lane-free-sms 16: prompts with 64K+ tokens
                     left prefill in the prefill lane (one GPU, cuda-bindings; only when named)

all with `--load-format dummy --no-enable-prefix-caching --tbt-slo-ms --max-num-batched-tokens`
(and `--latency-profile` when given). Per configuration: start the server, wait for /health
(up to `--startup-timeout-s`), warm up with a few short random requests, replay the trace,
read /metrics, stop the server with SIGINT. Raw files go to OUT/runs/ (the server's log, the
bench's JSON and log, the run's summary); OUT/serving_trace.json (and .png) gather every run
of the same trace found there, so configurations may run in separate invocations.

Reported per configuration: TTFT p50/p99 of short and of long requests; TBT p50/p99/max over
the gaps of short requests and of all; SLO attainment: the share of gaps <= --tbt-slo-ms, and
the share of requests (failures count as misses) whose TTFT is within its deadline; token
throughput. The deadline is LARS's rule, max(--deadline-factor x prefill floor,
--min-deadline-s), on the physical floor of the prompt's prefill (linear FLOPs at 800 TFLOP/s,
attention at 590 TFLOP/s, as in benchmarks/mixed_long_short.py), not on the server's latency
model: the same deadlines for every configuration and profile. The server's own count against
its model-based deadlines is kept beside it (`server_metrics`, from mnemosyne:ttft_slo).
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.serve_gpu import write_tokenizer
from benchmarks.serving_trace_data import (
    TraceSpec,
    analyze,
    floors_summary,
    make_trace,
    trace_id,
    trace_stats,
    ttft_deadlines_s,
    write_trace,
)
from benchmarks.serving_trace_server import CONFIGS, DEFAULT_CONFIGS, run_config
from mnemosyne.bench.long_context.run import SHAPES, write_model_dir

SHAPE_NAMES = {"1b": "llama3.2-1b", "8b": "llama3-8b"}


def device_name() -> str:
    """The GPU's name (or "cpu"), asked in a child process so no CUDA context stays here."""
    code = "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    return res.stdout.strip() or f"unknown ({res.stderr.strip()[-200:]})"


def build_model_dir(ns: argparse.Namespace) -> Path:
    """--model-dir as given, else a dummy model directory of the shape with a word-level tokenizer."""
    if ns.model_dir is not None:
        return ns.model_dir
    shape = SHAPE_NAMES[ns.shape]
    model_dir = write_model_dir(shape, Path(tempfile.mkdtemp(prefix="serving_trace_")))
    write_tokenizer(model_dir, SHAPES[shape]["vocab_size"], eos_id=128001)
    return model_dir


def _int_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(",")
    return int(lo), int(hi or lo)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPE_NAMES), default="8b", help="random-weight model shape")
    ap.add_argument(
        "--model-dir", type=Path, default=None, help="use this model (with tokenizer) instead of --shape"
    )
    ap.add_argument("--out", type=Path, required=True, help="output directory")
    ap.add_argument(
        "--configs", default=",".join(DEFAULT_CONFIGS), help="comma-separated subset of " + ", ".join(CONFIGS)
    )
    ap.add_argument(
        "--dry-run", action="store_true", help="only write the trace (OUT/trace.jsonl) and its stats"
    )
    ap.add_argument(
        "--combine-only",
        action="store_true",
        help="run nothing: rebuild OUT/serving_trace.json and .png from OUT/runs/*.json (same trace options)",
    )
    t = ap.add_argument_group("trace")
    t.add_argument("--duration-s", type=float, default=300.0)
    t.add_argument("--rate", type=float, default=0.5, help="requests/s (Poisson)")
    t.add_argument("--long-fraction", type=float, default=0.1)
    t.add_argument("--short-prompt", type=_int_range, default=(1024, 4096), help="LO,HI tokens")
    t.add_argument("--short-output", type=_int_range, default=(128, 512), help="LO,HI tokens")
    t.add_argument("--min-long-prompt", type=int, default=65536)
    t.add_argument("--max-long-prompt", type=int, default=524288, help="keep within the GPU's KV capacity")
    t.add_argument("--long-output", type=_int_range, default=(128, 128), help="LO,HI tokens")
    t.add_argument("--seed", type=int, default=0)
    s = ap.add_argument_group("server")
    s.add_argument("--dtype", default="bfloat16")
    s.add_argument("--device", default="auto")
    s.add_argument("--max-num-batched-tokens", type=int, default=8192 + 256)
    s.add_argument("--tbt-slo-ms", type=float, default=30.0)
    s.add_argument(
        "--prefill-only-step-ms", type=float, default=100.0, help="adaptive: a step with no decode"
    )
    s.add_argument(
        "--deadline-factor", type=float, default=1.5, help="TTFT deadline = max(factor x floor, min)"
    )
    s.add_argument("--min-deadline-s", type=float, default=0.5)
    s.add_argument("--latency-profile", type=Path, default=None, help="for the server (adaptive / lars)")
    s.add_argument(
        "--server-args", default="",
        help='more `mnemosyne serve` flags, one string; write it --server-args="--flag ..." (argparse takes '
        "a separate value that starts with a dash for an option)",
    )  # fmt: skip
    s.add_argument(
        "--step-logs", action="store_true",
        help="each server writes OUT/runs/CONFIG.steps.jsonl (every step; `refit_latency_profile --validation`)",
    )  # fmt: skip
    s.add_argument("--startup-timeout-s", type=float, default=300.0)
    s.add_argument("--request-timeout-s", type=float, default=300.0, help="per request (bench --timeout-s)")
    s.add_argument("--warmup-prompts", type=int, default=8, help="short random requests before the trace")
    ns = ap.parse_args(argv)
    ns.argv = list(sys.argv[1:] if argv is None else argv)
    ns.configs = [c for c in ns.configs.split(",") if c]
    unknown = sorted(set(ns.configs) - set(CONFIGS))
    if unknown:
        ap.error(f"unknown configs {unknown}; choose from {list(CONFIGS)}")
    return ns


def trace_spec(ns: argparse.Namespace) -> TraceSpec:
    return TraceSpec(
        duration_s=ns.duration_s, rate_per_s=ns.rate, long_fraction=ns.long_fraction,
        short_prompt=ns.short_prompt, short_output=ns.short_output,
        long_prompt=(ns.min_long_prompt, ns.max_long_prompt), long_output=ns.long_output, seed=ns.seed,
    )  # fmt: skip


def _interrupt(signum: int, frame: object) -> None:
    # `timeout`'s SIGTERM: stop the server on the way out; during the trace the client writes what it
    # measured and that run is analysed and kept, marked "interrupted" (`serving_trace_server.run_config`)
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> dict:
    ns = parse_args(argv)
    spec = trace_spec(ns)
    trace = make_trace(spec)
    tid = trace_id(spec, trace)
    model_dir = build_model_dir(ns)
    vocab_size = int(json.loads((model_dir / "config.json").read_text())["vocab_size"])
    ns.out.mkdir(parents=True, exist_ok=True)
    stats = trace_stats(trace)
    print(f"trace {tid}: {json.dumps(stats)}", flush=True)
    if ns.dry_run:
        write_trace(trace, ns.out / "trace.jsonl", vocab_size, spec.seed)
        print(f"wrote {ns.out / 'trace.jsonl'}")
        return {"trace_id": tid, "trace": stats}
    deadlines = ttft_deadlines_s(model_dir, trace, ns.deadline_factor, ns.min_deadline_s)
    floors = floors_summary(model_dir, spec, trace, [f for f, _ in deadlines])
    if ns.combine_only:
        return write_combined(ns, spec, trace, tid, floors)
    from mnemosyne.profiling.profiler import library_versions

    device = device_name()
    failed: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="serving_trace_") as tmp:  # the prompts: not worth keeping
        trace_path = Path(tmp) / "trace.jsonl"
        write_trace(trace, trace_path, vocab_size, spec.seed)
        for name in ns.configs:
            try:
                run = run_config(ns, name, model_dir, trace_path, len(trace), spec.max_total_len)
            except (RuntimeError, OSError, ValueError, subprocess.SubprocessError) as e:
                failed[name] = f"{type(e).__name__}: {e}"
                print(f"== {name} FAILED: {failed[name]}", flush=True)
                continue
            now = datetime.now(UTC).isoformat(timespec="seconds")
            run.update(device=device, date=now, invocation=ns.argv, libraries=library_versions())
            summary = analyze(trace, deadlines, run, ns.tbt_slo_ms)
            (ns.out / "runs" / f"{name}.json").write_text(json.dumps({"trace_id": tid, **summary}, indent=1))
            print(json.dumps({k: summary[k] for k in ("ttft", "tbt", "slo", "throughput")}), flush=True)
            if run.get("interrupted"):  # cut short (a time limit): what it measured, no further configs
                failed[name] = "interrupted: partial results"
                break
    combined = write_combined(ns, spec, trace, tid, floors)
    if failed:
        raise SystemExit(f"configurations that failed: {failed}")
    return combined


def server_flags(ns: argparse.Namespace) -> dict:
    """The flags every configuration's server takes from these options (for the result JSON)."""
    return {
        "dtype": ns.dtype,
        "max_num_batched_tokens": ns.max_num_batched_tokens,
        "tbt_slo_ms": ns.tbt_slo_ms,
        "prefill_only_step_ms": ns.prefill_only_step_ms,
        "latency_profile": str(ns.latency_profile) if ns.latency_profile else None,
        "prefix_caching": False,
        "server_args": ns.server_args,
    }


def ttft_deadline_text(ns: argparse.Namespace) -> str:
    return (
        f"max({ns.deadline_factor} x prefill floor, {ns.min_deadline_s} s); floor = whole-prompt prefill "
        "FLOPs (linear at 800 TFLOP/s, attention at 590 TFLOP/s), the same for every config"
    )


def write_combined(
    ns: argparse.Namespace, spec: TraceSpec, trace: list[dict], tid: str, floors: dict
) -> dict:
    """OUT/serving_trace.json (+ .png): every run in OUT/runs of this trace (device, date and
    libraries are the runs')."""
    results = {}
    for name in CONFIGS:
        path = ns.out / "runs" / f"{name}.json"
        if path.exists():
            run = json.loads(path.read_text())
            if run.pop("trace_id") == tid:
                results[name] = run
            else:
                print(f"skipping {path}: a run of another trace", flush=True)
    combined = {
        "benchmark": "serving_trace",
        "command": "python -m benchmarks.serving_trace " + shlex.join(ns.argv),
        "run_commands": {
            n: "python -m benchmarks.serving_trace " + shlex.join(r["invocation"]) for n, r in results.items()
        },
        "device": ", ".join(sorted({r["device"] for r in results.values()})),
        "date": ", ".join(sorted({r["date"][:10] for r in results.values()})),
        "libraries": next((r["libraries"] for r in results.values()), None),
        "shape": None if ns.model_dir else SHAPE_NAMES[ns.shape],
        "model_config": None if ns.model_dir else SHAPES[SHAPE_NAMES[ns.shape]],
        "trace_id": tid,
        "trace_spec": asdict(spec),
        "trace": trace_stats(trace),
        "configs": {name: CONFIGS[name] for name in results},
        "server_flags": server_flags(ns),
        "ttft_deadline": ttft_deadline_text(ns),
        "floors": floors,
        "results": results,
    }
    path = ns.out / "serving_trace.json"
    path.write_text(json.dumps(combined, indent=1))
    print(f"wrote {path}", flush=True)
    if results:
        try:
            from benchmarks.plot_serving_trace import plot

            plot(combined, path.with_suffix(".png"))
            print(f"wrote {path.with_suffix('.png')}", flush=True)
        except ImportError as e:  # matplotlib missing: the JSON has what the plot needs
            print(f"no plot ({e}); later: python -m benchmarks.plot_serving_trace {path}", flush=True)
    return combined


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    main()
