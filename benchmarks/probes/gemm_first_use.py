"""What a GEMM of a new row count costs the host the first time (GPU): cuBLAS picks its
kernel by the shape, and a kernel the process has not run yet is loaded (CUDA's lazy module
loading) or built on its first launch, inside the torch call, which holds the GIL.

The question (benchmarks/results/README.md, "Twenty-eighth session"): the prefill lane's
last, odd-sized chunk of a prompt (3103 or 663 tokens) spends ~120 ms more of host time
launching than a 4096-token chunk, and two of the decodes' token gaps take 45-50 ms as it
starts. A trace of it showed 19-28 ms host gaps before its first GEMMs, whose cuBLAS kernels
(nvjet 192x176, 128x288, 256x160) no 4096-token chunk used. This probe measures, in fresh
processes with CUDA_MODULE_LOADING=LAZY (the default) and EAGER:

    first / second call of each of `--rows` for the 8B shape's four projections
    every row count 1 .. --max-rows (step --step) of each: its kernel (torch.profiler) and
    the first calls that took over 2 ms of host time
    EAGER: the process's start-up to its first GEMM, and the device memory it holds

    python -m benchmarks.probes.gemm_first_use --out OUT.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

# (name, N, K) of the 8B shape's projections: out [M, N] = x [M, K] @ W^T
SHAPES = (("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336))
ROWS = (4096, 3103, 663, 3072, 3136, 4000, 2048, 1500, 1025, 8448, 8192, 5000, 6000, 7000)


def _timed(fn) -> float:
    import torch

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    return host


def child(rows: list[int], max_rows: int, step: int) -> dict:
    """Run in a fresh process: the measurements above, under this process's loading mode."""
    import torch

    t0 = time.perf_counter()
    torch.zeros(1, device="cuda")
    init_s = time.perf_counter() - t0
    free0, total = torch.cuda.mem_get_info()
    weights = {name: torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for name, n, k in SHAPES}
    x_max = torch.randn(max(max_rows, max(rows)), max(k for _, _, k in SHAPES), device="cuda", dtype=torch.bfloat16)
    t0 = time.perf_counter()
    torch.nn.functional.linear(x_max[:16, :4096], weights["qkv"])
    torch.cuda.synchronize()
    first_gemm_s = time.perf_counter() - t0
    out: dict = {"module_loading": os.environ.get("CUDA_MODULE_LOADING", "LAZY (default)"), "init_s": init_s,
                 "first_gemm_s": first_gemm_s, "free_before_gb": free0 / 2**30}  # fmt: skip
    calls = []
    for name, _, k in SHAPES:
        for m in rows:
            def call(name=name, m=m, k=k) -> None:
                torch.nn.functional.linear(x_max[:m, :k], weights[name])

            calls.append({"shape": name, "rows": m, "first_ms": 1e3 * _timed(call), "second_ms": 1e3 * _timed(call)})
    out["calls"] = calls
    sweep = {}
    for name, _, k in SHAPES:
        slow: list[list[float]] = []  # [rows, host ms] of first calls over 2 ms (no profiler)
        for m in range(1, max_rows + 1, step):
            host = _timed(lambda m=m, k=k, name=name: torch.nn.functional.linear(x_max[:m, :k], weights[name]))
            if host > 2e-3:
                slow.append([m, round(1e3 * host, 2)])
        # then the kernel of each row count (everything is loaded by now): one profile, each
        # call inside a named range that its kernels run within (the sync is inside it)
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:
            for m in range(1, max_rows + 1, step):
                with torch.profiler.record_function(f"rows={m}"):
                    torch.nn.functional.linear(x_max[:m, :k], weights[name])
                    torch.cuda.synchronize()
        events = prof.events()
        marks = sorted((e.time_range.start, e.time_range.end, int(e.name[5:])) for e in events
                       if e.name.startswith("rows="))  # fmt: skip
        gpu = sorted((e.time_range.start, e.name) for e in events
                     if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith("rows="))  # fmt: skip
        kernels: dict[int, set[str]] = {m: set() for _, _, m in marks}
        i = 0
        for start, kname in gpu:
            while i < len(marks) and marks[i][1] < start:
                i += 1
            if i < len(marks) and marks[i][0] <= start:
                kernels[marks[i][2]].add(kname[:90])
        ranges: list[list] = []  # [first rows, last rows, kernels] runs of one kernel set
        for m in sorted(kernels):
            kern = "+".join(sorted(kernels[m]))
            if ranges and ranges[-1][2] == kern:
                ranges[-1][1] = m
            else:
                ranges.append([m, m, kern])
        sweep[name] = {"distinct_kernel_sets": len({r[2] for r in ranges}), "ranges": ranges, "slow_first_calls": slow}
    out["sweep"] = sweep
    free1, _ = torch.cuda.mem_get_info()
    out["free_after_gb"] = free1 / 2**30
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default=",".join(map(str, ROWS)))
    ap.add_argument("--max-rows", type=int, default=8448)
    ap.add_argument("--step", type=int, default=1)
    ap.add_argument("--modes", default="LAZY,EAGER")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, required=False)
    ns = ap.parse_args()
    rows = [int(r) for r in ns.rows.split(",")]
    if ns.child:
        print(json.dumps(child(rows, ns.max_rows, ns.step)))
        return
    import torch

    result = {"probe": "gemm_first_use", "date": datetime.now(UTC).isoformat(), "gpu": torch.cuda.get_device_name(),
              "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(), "runs": []}  # fmt: skip
    for mode in ns.modes.split(","):
        env = {**os.environ, "CUDA_MODULE_LOADING": mode}
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "benchmarks.probes.gemm_first_use", "--child", "--rows", ns.rows,
               "--max-rows", str(ns.max_rows), "--step", str(ns.step)]  # fmt: skip
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        run = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {"error": proc.stderr[-3000:]}
        run["process_s"] = time.perf_counter() - t0
        run["mode"] = mode
        result["runs"].append(run)
        print(json.dumps({k: v for k, v in run.items() if k not in ("sweep", "calls")}), flush=True)
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {ns.out}")


if __name__ == "__main__":
    main()
