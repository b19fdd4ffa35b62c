"""A serving trace through the real server: Poisson arrivals of short and long requests,
replayed by `mnemosyne bench serve` against `mnemosyne serve` under each scheduling setup.

    python -m benchmarks.serving_trace --shape 8b --duration-s 90 --rate 0.5 \\
        --max-long-prompt 131072 --out benchmarks/results/serving_trace_8b
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

all with `--load-format dummy --no-enable-prefix-caching --tbt-slo-ms --max-num-batched-tokens`
(and `--latency-profile` when given). Per configuration: start the server, wait for /health
(up to `--startup-timeout-s`), warm up with a few short random requests, replay the trace,
read /metrics, stop the server with SIGINT. Raw files go to OUT/runs/; OUT/serving_trace.json
(and .png) gather every run of the same trace found there, so configurations may run in
separate invocations (one command each keeps every call short).

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
import itertools
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.serve_gpu import wait_healthy, write_tokenizer
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
from mnemosyne.bench.long_context.run import SHAPES, write_model_dir

SHAPE_NAMES = {"1b": "llama3.2-1b", "8b": "llama3-8b"}
CONFIGS: dict[str, list[str]] = {
    "fcfs_fixed512": ["--chunk-policy", "fixed", "--chunk-size", "512", "--scheduling-policy", "fcfs"],
    "fcfs_fixed2048": ["--chunk-policy", "fixed", "--chunk-size", "2048", "--scheduling-policy", "fcfs"],
    "lars_adaptive": ["--chunk-policy", "adaptive", "--scheduling-policy", "lars"],
}
SERVER_METRICS = ("mnemosyne:tbt_slo_total", "mnemosyne:ttft_slo_total", "mnemosyne:num_preemptions_total")
SERVER_HISTOGRAMS = ("mnemosyne:step_time_predicted_over_actual", "mnemosyne:prefill_chunk_tokens")


def server_command(
    ns: argparse.Namespace, model_dir: Path, port: int, config: str, max_len: int
) -> list[str]:
    """`mnemosyne serve` for one configuration: random weights, no prefix cache, the trace's longest request."""
    return [
        sys.executable, "-m", "mnemosyne.cli", "serve", "--model", str(model_dir), "--port", str(port),
        "--load-format", "dummy", "--dtype", ns.dtype, "--device", ns.device, "--no-enable-prefix-caching",
        "--no-access-log", "--log-level", "info", "--shutdown-timeout-s", "5", "--max-model-len", str(max_len),
        "--max-num-batched-tokens", str(ns.max_num_batched_tokens), "--tbt-slo-ms", str(ns.tbt_slo_ms),
        "--deadline-factor", str(ns.deadline_factor), "--min-deadline-s", str(ns.min_deadline_s),
        *(["--latency-profile", str(ns.latency_profile)] if ns.latency_profile else []),
        *CONFIGS[config], *shlex.split(ns.server_args),
    ]  # fmt: skip


def bench_command(url: str, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mnemosyne.cli",
        "bench",
        "serve",
        "--base-url",
        url,
        "--no-progress",
        *args,
    ]


def _last_line(path: Path) -> str:
    lines = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
    return lines[-1][-160:] if lines else ""


def engine_summary(log: Path) -> list[str]:
    """The server's start-up summary (KV capacity, chunk policy, latency model, ...) from its log."""
    lines = log.read_text(errors="replace").splitlines()
    start = next((i for i, line in enumerate(lines) if line.endswith("engine ready:")), len(lines))
    return [line.strip() for line in itertools.takewhile(lambda x: x.startswith("  "), lines[start + 1 :])]


def _wait_logging(proc: subprocess.Popen, what: str, limit_s: float, log: Path) -> int:
    """Wait for `proc` (at most limit_s), printing progress and the server log's last line every 30 s."""
    t0 = time.monotonic()
    while True:
        try:
            return proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            elapsed = time.monotonic() - t0
            print(f"  {what}: {elapsed:.0f} s | server: {_last_line(log)}", flush=True)
            if elapsed > limit_s:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"{what} ran past {limit_s:.0f} s") from None


def read_server_metrics(url: str) -> dict[str, float]:
    """The SLO counters, preemptions and the step-time-ratio / chunk-size histograms' sum and count."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    text = httpx.get(url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            label = ",".join(f"{k}={v}" for k, v in s.labels.items() if k not in ("model_name", "le"))
            key = s.name + (f"{{{label}}}" if label else "")
            if s.name in SERVER_METRICS or s.name in {
                h + suffix for h in SERVER_HISTOGRAMS for suffix in ("_sum", "_count")
            }:
                out[key] = s.value
    return out


def stop_server(proc: subprocess.Popen) -> int:
    """SIGINT (drain and stop), then SIGKILL to its process group after 90 s; the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            print("  server did not stop within 90 s after SIGINT: killing its process group", flush=True)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


def run_config(
    ns: argparse.Namespace, name: str, model_dir: Path, trace_path: Path, num: int, max_len: int
) -> dict:
    """One configuration on a fresh server; the raw bench result, server metrics and timings."""
    from mnemosyne.server.launch import free_port

    runs = ns.out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    log = runs / f"{name}.server.log"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = server_command(ns, model_dir, port, name, max_len)
    print(f"== {name}: starting the server\n  {shlex.join(cmd)}", flush=True)
    t0 = time.monotonic()
    with log.open("w") as log_f:
        server = subprocess.Popen(cmd, stdout=log_f, stderr=subprocess.STDOUT, start_new_session=True)
    out: dict = {"config": name, "server_command": cmd}
    try:
        wait_healthy(url, server, ns.startup_timeout_s, log_every_s=15.0)
        out["startup_s"] = time.monotonic() - t0
        out["server_summary"] = engine_summary(log)
        shown = [
            x for x in out["server_summary"] if x.startswith(("KV capacity", "chunk policy", "latency model"))
        ]
        print(
            f"  healthy after {out['startup_s']:.0f} s; " + "; ".join(" ".join(x.split()) for x in shown),
            flush=True,
        )
        if ns.warmup_prompts > 0:
            warm = bench_command(url, "--num-prompts", str(ns.warmup_prompts), "--input-len",
                                 str(ns.short_prompt[0]), "--output-len", "16")  # fmt: skip
            subprocess.run(warm, check=True, capture_output=True, text=True, timeout=600)
        result_path = runs / f"{name}.bench.json"
        bench = bench_command(url, "--dataset", "file", "--dataset-path", str(trace_path), "--num-prompts", str(num),
                              "--slo-tbt-ms", str(ns.tbt_slo_ms), "--timeout-s", str(ns.request_timeout_s),
                              "--result-json", str(result_path))  # fmt: skip
        bench_log = runs / f"{name}.bench.log"
        t1 = time.monotonic()
        with bench_log.open("w") as bench_f:
            proc = subprocess.Popen(bench, stdout=bench_f, stderr=subprocess.STDOUT)
            limit = ns.duration_s + ns.request_timeout_s + 120
            rc = _wait_logging(proc, f"{name} trace", limit, log)
        out["bench_s"] = time.monotonic() - t1
        print(bench_log.read_text()[-3000:], flush=True)
        if rc != 0 and not result_path.exists():
            raise RuntimeError(f"bench serve failed (exit {rc}); see {bench_log}")
        out["server_metrics"] = read_server_metrics(url)
        out["bench"] = json.loads(result_path.read_text())
    except BaseException:
        print(f"  server log tail ({log}):\n" + log.read_text(errors="replace")[-3000:], flush=True)
        raise
    finally:
        out["server_exit_code"] = stop_server(server)
    return out


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
        "--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ", ".join(CONFIGS)
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
        "--deadline-factor", type=float, default=1.5, help="TTFT deadline = max(factor x floor, min)"
    )
    s.add_argument("--min-deadline-s", type=float, default=0.5)
    s.add_argument("--latency-profile", type=Path, default=None, help="for the server (adaptive / lars)")
    s.add_argument("--server-args", default="", help="more `mnemosyne serve` flags, one string")
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
    combined = write_combined(ns, spec, trace, tid, floors)
    if failed:
        raise SystemExit(f"configurations that failed: {failed}")
    return combined


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
        "server_flags": {
            "dtype": ns.dtype,
            "max_num_batched_tokens": ns.max_num_batched_tokens,
            "tbt_slo_ms": ns.tbt_slo_ms,
            "latency_profile": str(ns.latency_profile) if ns.latency_profile else None,
            "prefix_caching": False,
            "server_args": ns.server_args,
        },  # fmt: skip
        "ttft_deadline": f"max({ns.deadline_factor} x prefill floor, {ns.min_deadline_s} s); floor = whole-prompt prefill "
        "FLOPs (linear at 800 TFLOP/s, attention at 590 TFLOP/s), the same for every config",  # fmt: skip
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
    main()
