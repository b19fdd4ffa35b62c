"""What holds the decodes' tokens as a long prompt's last prefill lane chunk starts: a
torch.profiler trace of the engine from its last two lane chunks to its first token.

The question (benchmarks/results/README.md, "Twenty-eighth session"): in the 8B mixed
scenario two token gaps of 45-50 ms come as the last, odd-sized lane chunk (3103 tokens after
259040 keys) starts, the steps' results late in `get_result` (the step log's `wait_s`), every
other chunk boundary clean. The trace has every thread's CPU ops and CUDA runtime calls and
every stream's kernels; the report lists, in the window, the host calls over `--long-call-ms`
per thread (a synchronizing copy or a GIL-holding call shows here), each stream's kernel
gaps over that, and the steps' results (engine-side: when the engine read each step).

    python -m benchmarks.probes.lane_transition_trace --out OUT.json [--shape llama3-8b] \
        [--long-len 262144] [--trace OUT.trace.json.gz] [--long-call-ms 5]

Same engine and policies as `benchmarks/mixed_long_short.py`'s `adaptive_lars_lane`. Needs a
GPU and `cuda-bindings` (green contexts).
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from benchmarks.mixed_long_short import CONFIGS, scheduling_engine_args, use_policies
from mnemosyne.bench.long_context.engine import random_prompt
from mnemosyne.bench.long_context.run import SHAPES, write_model_dir


def long_host_calls(trace: dict, min_ms: float) -> list[dict]:
    """CPU ops and CUDA runtime calls of at least `min_ms`, per thread, oldest first."""
    out = []
    for ev in trace.get("traceEvents", []):
        if ev.get("ph") != "X" or ev.get("cat") not in ("cpu_op", "cuda_runtime", "cuda_driver", "user_annotation"):
            continue
        if ev.get("dur", 0) >= 1e3 * min_ms:
            out.append({"tid": ev.get("tid"), "cat": ev["cat"], "name": ev["name"], "ts_ms": ev["ts"] / 1e3,
                        "dur_ms": ev["dur"] / 1e3})  # fmt: skip
    return sorted(out, key=lambda e: e["ts_ms"])


def kernel_gaps(trace: dict, min_ms: float) -> dict[str, list[dict]]:
    """Per CUDA stream: its kernels' busy time and the gaps of at least `min_ms` between them."""
    by_stream: dict[str, list[tuple[float, float, str]]] = {}
    for ev in trace.get("traceEvents", []):
        if ev.get("ph") == "X" and ev.get("cat") == "kernel":
            stream = str(ev.get("args", {}).get("stream", ev.get("tid")))
            by_stream.setdefault(stream, []).append((ev["ts"] / 1e3, ev["dur"] / 1e3, ev["name"][:60]))
    out = {}
    for stream, ks in by_stream.items():
        ks.sort()
        gaps = [{"after_ms": a + d, "gap_ms": b - (a + d), "before": name}
                for (a, d, _), (b, _, name) in zip(ks, ks[1:], strict=False) if b - (a + d) >= min_ms]  # fmt: skip
        out[stream] = {"kernels": len(ks), "busy_ms": sum(d for _, d, _ in ks), "first_ms": ks[0][0],
                       "last_ms": ks[-1][0] + ks[-1][1], "gaps": gaps}  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--long-len", type=int, default=262144)
    ap.add_argument("--short-len", type=int, default=1024)
    ap.add_argument("--num-short", type=int, default=32)
    ap.add_argument("--free-sms", type=int, default=16)
    ap.add_argument("--max-free-sms", type=int, default=32)
    ap.add_argument("--chunk-tokens", type=int, default=4096)
    ap.add_argument("--profile", default=None, help="latency profile (as mixed_long_short's --profile)")
    ap.add_argument("--long-call-ms", type=float, default=5.0)
    ap.add_argument("--kv-fraction", type=float, default=0.9)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tbt-slo-ms", type=float, default=30.0)
    ap.add_argument("--tbt-slo-quantile", type=float, default=0.98)
    ap.add_argument("--trace", type=Path, default=None, help="also keep the chrome trace here (.json.gz)")
    ap.add_argument("--out", type=Path, required=True)
    ns = ap.parse_args()

    from mnemosyne import SamplingParams
    from mnemosyne.config import PrefillLaneConfig
    from mnemosyne.engine.llm_engine import LLMEngine
    from mnemosyne.gc_heap import freeze_startup_heap

    model_dir = write_model_dir(ns.shape, Path(tempfile.mkdtemp()))
    args = scheduling_engine_args(
        model_dir, ns, chunk_policy="adaptive", tbt_slo_ms=ns.tbt_slo_ms, enable_prefix_caching=False,
        prefill_lane_free_sms=ns.free_sms, prefill_lane_chunk_tokens=ns.chunk_tokens,
        prefill_lane_max_free_sms=ns.max_free_sms,
    )  # fmt: skip
    engine = LLMEngine.from_args(args)
    freeze_startup_heap()
    lane = PrefillLaneConfig(ns.free_sms, engine.config.scheduler.prefill_lane.min_prompt_tokens, ns.chunk_tokens,
                             ns.max_free_sms)  # fmt: skip
    use_policies(engine, CONFIGS["adaptive_lars_lane"], ns.tbt_slo_ms, ns.tbt_slo_quantile, lane)
    vocab = engine.config.model.vocab_size
    params = SamplingParams(temperature=0, max_tokens=8192, ignore_eos=True)
    shorts = [engine.add_request(random_prompt(ns.short_len, seed=100 + i, max_id=vocab), params)
              for i in range(ns.num_short)]  # fmt: skip
    seen: dict[str, int] = {}
    while sum(1 for rid in shorts if seen.get(rid, 0) >= 2) < len(shorts):
        for out in engine.step():
            seen[out.request_id] = len(out.token_ids)
    long_prompt = np.asarray(random_prompt(ns.long_len, seed=7, max_id=vocab), dtype=np.int32)
    t_arrival = time.monotonic()
    long_id = engine.add_request(long_prompt, SamplingParams(temperature=0, max_tokens=1))
    request = engine.scheduler._requests[long_id]
    trace_from = ns.long_len - 1 - 2 * ns.chunk_tokens  # the last two lane chunks still to launch
    prof = None
    t_window = 0.0
    reads: list[float] = []  # when the engine read each step's result (monotonic s), in the window
    done = False
    while not done:
        if prof is None and request.num_dispatched_tokens >= trace_from:
            prof = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            )
            prof.__enter__()
            t_window = time.monotonic()
        if prof is None:
            outs = engine.step()
        else:
            with torch.profiler.record_function("engine.step"):  # the engine's steps in the trace
                outs = engine.step()
            reads.append(time.monotonic())
        done = any(o.request_id == long_id and o.finished for o in outs)
    t_first = time.monotonic()
    prof.__exit__(None, None, None)
    tmp = Path(tempfile.mkdtemp()) / "trace.json"
    prof.export_chrome_trace(str(tmp))
    trace = json.loads(tmp.read_text())
    if ns.trace is not None:
        ns.trace.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "rb") as src, gzip.open(ns.trace, "wb") as dst:
            shutil.copyfileobj(src, dst)
    gaps = sorted(b - a for a, b in zip(reads, reads[1:], strict=False))
    result = {
        "probe": "lane_transition_trace", "date": datetime.now(UTC).isoformat(),
        "gpu": torch.cuda.get_device_name(), "args": {k: str(v) for k, v in vars(ns).items()},
        "long_ttft_s": t_first - t_arrival, "window_s": t_first - t_window,
        "step_reads_ms": [round(1e3 * (t - t_window), 2) for t in reads],
        "longest_read_gaps_ms": [round(1e3 * g, 2) for g in gaps[-8:]],
        "long_host_calls": long_host_calls(trace, ns.long_call_ms),
        "kernel_gaps": kernel_gaps(trace, ns.long_call_ms),
    }  # fmt: skip
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps(result, indent=1))
    engine.shutdown()
    print(json.dumps({k: result[k] for k in ("long_ttft_s", "window_s", "longest_read_gaps_ms")}))
    print(f"wrote {ns.out}")


if __name__ == "__main__":
    main()
