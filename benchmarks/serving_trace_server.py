"""The serving-trace benchmark's server runs: one configuration on a fresh `mnemosyne serve`
subprocess, replayed by a `mnemosyne bench serve` subprocess. See benchmarks/serving_trace.py."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.serve_gpu import wait_healthy

CONFIGS: dict[str, list[str]] = {
    "fcfs_fixed512": ["--chunk-policy", "fixed", "--chunk-size", "512", "--scheduling-policy", "fcfs"],
    "fcfs_fixed2048": ["--chunk-policy", "fixed", "--chunk-size", "2048", "--scheduling-policy", "fcfs"],
    "lars_adaptive": ["--chunk-policy", "adaptive", "--scheduling-policy", "lars"],
    "fcfs_adaptive": ["--chunk-policy", "adaptive", "--scheduling-policy", "fcfs"],  # adaptive without LARS
    # lars_adaptive with the prefill lane (one GPU; needs cuda-bindings): the steps keep 16-32 SMs
    "lars_adaptive_lane": ["--chunk-policy", "adaptive", "--scheduling-policy", "lars", "--prefill-lane-free-sms", "16"],
}
DEFAULT_CONFIGS = ("fcfs_fixed512", "fcfs_fixed2048", "lars_adaptive")  # the scheduling issue's three
SERVER_METRICS = ("mnemosyne:tbt_slo_total", "mnemosyne:ttft_slo_total", "mnemosyne:num_preemptions_total")
SERVER_HISTOGRAMS = ("mnemosyne:step_time_predicted_over_actual", "mnemosyne:prefill_chunk_tokens")
BENCH_GRACE_S = 30.0  # an interrupted `bench serve`'s time to write what arrived


def server_command(
    ns: argparse.Namespace, model_dir: Path, port: int, config: str, max_len: int
) -> list[str]:
    """`mnemosyne serve` for one configuration: random weights, no prefix cache, the trace's longest request."""
    return [
        sys.executable, "-m", "mnemosyne.cli", "serve", "--model", str(model_dir), "--port", str(port),
        "--load-format", "dummy", "--dtype", ns.dtype, "--device", ns.device, "--no-enable-prefix-caching",
        "--no-access-log", "--log-level", "info", "--shutdown-timeout-s", "5", "--max-model-len", str(max_len),
        "--max-num-batched-tokens", str(ns.max_num_batched_tokens), "--tbt-slo-ms", str(ns.tbt_slo_ms),
        "--prefill-only-step-ms", str(ns.prefill_only_step_ms),
        "--deadline-factor", str(ns.deadline_factor), "--min-deadline-s", str(ns.min_deadline_s),
        *(["--latency-profile", str(ns.latency_profile)] if ns.latency_profile else []),
        *(["--step-log", str(ns.out / "runs" / f"{config}.steps.jsonl")] if ns.step_logs else []),
        *CONFIGS[config], *shlex.split(ns.server_args),
    ]  # fmt: skip


def bench_command(url: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "mnemosyne.cli", "bench", "serve", "--base-url", url, "--no-progress", *args]  # fmt: skip


def _last_line(path: Path) -> str:
    lines = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
    return lines[-1][-160:] if lines else ""


def engine_summary(log: Path) -> list[str]:
    """The server's start-up summary (KV capacity, chunk policy, latency model, ...) from its log."""
    lines = log.read_text(errors="replace").splitlines()
    start = next((i for i, line in enumerate(lines) if line.endswith("engine ready:")), len(lines))
    return [line.strip() for line in itertools.takewhile(lambda x: x.startswith("  "), lines[start + 1 :])]


def _wait_logging(proc: subprocess.Popen, what: str, limit_s: float, log: Path) -> int:
    """Wait for `proc` (killed past limit_s), printing progress and the server log's last line
    every 30 s; its exit code. Interrupted (KeyboardInterrupt, re-raised), `proc` first gets
    SIGTERM and BENCH_GRACE_S to stop: `bench serve` then writes what arrived."""
    t0 = time.monotonic()
    try:
        while True:
            try:
                return proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                elapsed = time.monotonic() - t0
                print(f"  {what}: {elapsed:.0f} s | server: {_last_line(log)}", flush=True)
                if elapsed > limit_s:
                    raise RuntimeError(f"{what} ran past {limit_s:.0f} s") from None
    except KeyboardInterrupt:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=BENCH_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
        raise
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


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


def _descendants(pid: int) -> list[int]:
    """The ids of every process below `pid` (from Linux's /proc; none elsewhere)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # "pid (comm) state ppid ..."
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_server(proc: subprocess.Popen, wait_s: float = 60.0) -> int:
    """SIGINT (drain and stop), SIGKILL after `wait_s`; then wait for its engine core and workers
    to be gone (SIGKILL by id after `wait_s`), so the next server finds the GPU memory free.
    The server's exit code."""
    below = _descendants(proc.pid)
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            print(f"  server did not stop within {wait_s:.0f} s of SIGINT: killing it", flush=True)
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + wait_s
    while any(_alive(pid) for pid in below) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in filter(_alive, below):
        print(f"  server child {pid} still running: killing it", flush=True)
        os.kill(pid, signal.SIGKILL)
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
        server = subprocess.Popen(cmd, stdout=log_f, stderr=subprocess.STDOUT)
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
        if ns.warmup_prompts > 0:  # short prompts at once, then one longer prompt (prefill over a prefix)
            t_warm = time.monotonic()
            for n, input_len, output_len in ((ns.warmup_prompts, ns.short_prompt[0], 16),
                                             (1, min(ns.min_long_prompt, 16384), 4)):  # fmt: skip
                warm = bench_command(url, "--num-prompts", str(n), "--input-len", str(input_len),
                                     "--output-len", str(output_len))  # fmt: skip
                subprocess.run(warm, check=True, capture_output=True, text=True, timeout=600)
            out["warmup_s"] = time.monotonic() - t_warm
        result_path = runs / f"{name}.bench.json"
        bench = bench_command(url, "--dataset", "file", "--dataset-path", str(trace_path), "--num-prompts", str(num),
                              "--slo-tbt-ms", str(ns.tbt_slo_ms), "--timeout-s", str(ns.request_timeout_s),
                              "--result-json", str(result_path))  # fmt: skip
        bench_log = runs / f"{name}.bench.log"
        t1 = time.monotonic()
        with bench_log.open("w") as bench_f:
            proc = subprocess.Popen(bench, stdout=bench_f, stderr=subprocess.STDOUT)
            limit = ns.duration_s + ns.request_timeout_s + 120
            try:
                rc = _wait_logging(proc, f"{name} trace", limit, log)
            except KeyboardInterrupt:  # a time limit's SIGTERM: keep what the client measured
                if not result_path.exists():
                    raise
                out["interrupted"] = True
                rc = proc.returncode
                print(f"== {name}: interrupted; the client's partial results are kept", flush=True)
        out["bench_s"] = time.monotonic() - t1
        print(bench_log.read_text()[-3000:], flush=True)
        if rc != 0 and not result_path.exists():
            raise RuntimeError(f"bench serve failed (exit {rc}); see {bench_log}")
        if not out.get("interrupted"):  # (interrupted, the server may be stopping too)
            out["server_metrics"] = read_server_metrics(url)
        out["bench"] = json.loads(result_path.read_text())
    except BaseException:
        print(f"  server log tail ({log}):\n" + log.read_text(errors="replace")[-3000:], flush=True)
        raise
    finally:
        out["server_exit_code"] = stop_server(server)
    return out
