"""Where a prefill-lane chunk's time goes: the engine's 4096-token chunks of a long prompt
late in its prefill, timed and traced (torch.profiler) three ways on one engine:

    whole        fixed 4096-token chunks in the steps, every SM, nothing else running
    lane_alone   the prefill lane (`--free-sms` SMs left to the steps), no other request
    lane_beside  the lane beside `--num-short` decodes of `--short-len`-token prompts

The question: the twenty-second session's probe (`two_lane_overlap`) ran a 4096-token chunk
after 224K keys beside 32 decodes on 16 SMs at 1.16x its whole-GPU time, where the engine's
lane chunks ran at ~1.35x (benchmarks/results/README.md, "Twenty-fourth session", `d/`).
Per phase it reports each chunk's wall time (when the engine saw its tokens computed) and,
over the traced chunks, every CUDA stream's kernel time by kind (GEMM, attention, merge,
other), its busy time (the union of its kernels) and its idle gaps, and the top kernels.

    python -m benchmarks.probes.lane_chunk_profile --out OUT.json [--shape llama3-8b] \
        [--long-len 245760] [--traced-chunks 3] [--free-sms 16] [--max-free-sms 32]
        [--phases whole,lane_alone,lane_beside]

Needs a GPU and `cuda-bindings` (green contexts) for the lane phases.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from benchmarks.mixed_long_short import scheduling_engine_args, use_policies
from mnemosyne.bench.long_context.engine import random_prompt
from mnemosyne.bench.long_context.run import SHAPES, write_model_dir

PHASES = {
    "whole": dict(chunk_policy="fixed", chunk_size=4096, scheduling_policy="fcfs"),
    "lane_alone": dict(chunk_policy="adaptive", chunk_size=None, scheduling_policy="lars", prefill_lane=True),
    "lane_beside": dict(
        chunk_policy="adaptive", chunk_size=None, scheduling_policy="lars", prefill_lane=True
    ),
}
KINDS = (("attention", ("fmha", "cudnn", "flash", "attn", "sdpa")), ("gemm", ("gemm", "cutlass", "nvjet", "xmma")),
         ("merge", ("merge",)))  # fmt: skip


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KINDS if any(k in low for k in keys)), "other")


def stream_report(events: list[tuple[int, str, int, int]]) -> list[dict]:
    """(stream, name, start_ns, duration_ns) kernels -> per stream: time by kind, busy, gaps."""
    by_stream: dict[int, list[tuple[str, int, int]]] = defaultdict(list)
    for stream, name, start, dur in events:
        by_stream[stream].append((name, start, dur))
    out = []
    for stream, ks in sorted(by_stream.items(), key=lambda kv: -sum(d for _, _, d in kv[1])):
        ks.sort(key=lambda k: k[1])
        busy, end, gaps = 0, None, []
        for _, start, dur in ks:
            if end is not None and start > end:
                gaps.append(start - end)
            lo = start if end is None else max(start, end)
            busy += max(0, start + dur - lo)
            end = start + dur if end is None else max(end, start + dur)
        by_kind: dict[str, float] = defaultdict(float)
        by_name: dict[str, list[float]] = defaultdict(list)
        for name, _, dur in ks:
            by_kind[kind_of(name)] += dur / 1e6
            by_name[name].append(dur / 1e6)
        top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:10]
        out.append({
            "stream": stream, "num_kernels": len(ks), "span_ms": (end - ks[0][1]) / 1e6, "busy_ms": busy / 1e6,
            "kernel_ms_by_kind": {k: round(v, 3) for k, v in sorted(by_kind.items())},
            "gaps": {"num": len(gaps), "sum_ms": sum(gaps) / 1e6, "max_ms": max(gaps, default=0) / 1e6,
                     "num_over_100us": sum(1 for g in gaps if g > 100_000)},
            "top_kernels": [{"name": n[:120], "count": len(d), "sum_ms": round(sum(d), 3),
                             "mean_us": round(1e3 * statistics.fmean(d), 1)} for n, d in top],
        })  # fmt: skip
    return out


def kernel_events(prof: torch.profiler.profile) -> list[tuple[int, str, int, int]]:
    events = []
    for e in prof.profiler.kineto_results.events():
        if e.device_type() == torch.autograd.DeviceType.CUDA and e.duration_ns() > 0:
            events.append((e.device_resource_id(), e.name(), e.start_ns(), e.duration_ns()))
    return [e for e in events if "memcpy" not in e[1].lower() and "memset" not in e[1].lower()]


ACTIVITY = (
    torch.profiler.ProfilerActivity.CUDA if torch.cuda.is_available() else torch.profiler.ProfilerActivity.CPU
)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_phase(engine, phase: str, ns: argparse.Namespace) -> dict:
    from mnemosyne import SamplingParams
    from mnemosyne.config import PrefillLaneConfig

    lane = PrefillLaneConfig(ns.free_sms, 65536, 4096, ns.max_free_sms or ns.free_sms)
    use_policies(engine, PHASES[phase], 30.0, 0.5, lane)
    vocab = engine.config.model.vocab_size
    shorts = []
    if phase == "lane_beside":
        params = SamplingParams(temperature=0, max_tokens=100_000, ignore_eos=True)
        shorts = [engine.add_request(random_prompt(ns.short_len, seed=100 + i, max_id=vocab), params)
                  for i in range(ns.num_short)]  # fmt: skip
        while any(len(engine.scheduler.get_request(r).output_token_ids) < 2 for r in shorts):
            engine.step()
    prompt = np.asarray(random_prompt(ns.long_len, seed=7, max_id=vocab), dtype=np.int32)
    t0 = time.monotonic()
    long_id = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=1))
    req = engine.scheduler.get_request(long_id)
    trace_from = ns.long_len - ns.traced_chunks * 4096 - 1
    chunks, last, prof, done = [], 0, None, False
    t_last = t0
    while not done:
        for out in engine.step():
            done |= out.request_id == long_id and out.finished
        now = time.monotonic()
        computed = req.num_computed_tokens if not done else ns.long_len
        if computed != last:
            chunks.append({"prefix": last, "tokens": computed - last, "wall_ms": 1e3 * (now - t_last)})
            last, t_last = computed, now
        if prof is None and not done and last >= trace_from:
            sync()
            prof = torch.profiler.profile(activities=[ACTIVITY])
            prof.__enter__()
            t_trace = time.monotonic()
    sync()
    traced_s = time.monotonic() - t_trace
    prof.__exit__(None, None, None)
    for r in shorts:
        engine.abort(r)
    while engine.has_unfinished_requests():
        engine.step()
    big = [c for c in chunks if c["tokens"] >= 2048]
    return {
        "phase": phase, **PHASES[phase], "ttft_s": t_last - t0, "traced_s": traced_s,
        "chunks": chunks, "late_chunks_ms": [round(c["wall_ms"], 1) for c in big if c["prefix"] >= trace_from - 4096],
        "streams": stream_report(kernel_events(prof)),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--long-len", type=int, default=245760)
    ap.add_argument("--traced-chunks", type=int, default=3)
    ap.add_argument("--num-short", type=int, default=32)
    ap.add_argument("--short-len", type=int, default=1024)
    ap.add_argument("--free-sms", type=int, default=16)
    ap.add_argument(
        "--max-free-sms", type=int, default=0, help="the most SMs a chunk leaves the steps (0: --free-sms)"
    )
    ap.add_argument("--phases", default=",".join(PHASES))
    ap.add_argument("--profile", default=None, help="latency profile JSON")
    ap.add_argument("--kv-fraction", type=float, default=0.9)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, required=True)
    ns = ap.parse_args()

    from mnemosyne.engine.llm_engine import LLMEngine
    from mnemosyne.profiling.profiler import library_versions

    model_dir = write_model_dir(ns.shape, Path(tempfile.mkdtemp()))
    args = scheduling_engine_args(
        model_dir, ns, chunk_policy="adaptive", enable_prefix_caching=False,
        prefill_lane_free_sms=ns.free_sms, prefill_lane_max_free_sms=ns.max_free_sms or ns.free_sms,
    )  # fmt: skip
    t = time.monotonic()
    engine = LLMEngine.from_args(args)
    res = {"probe": "lane_chunk_profile", "date": datetime.now(UTC).isoformat(), "device": library_versions(),
           "args": {k: str(v) for k, v in vars(ns).items()}, "startup_s": time.monotonic() - t, "phases": []}  # fmt: skip
    for phase in ns.phases.split(","):
        res["phases"].append(run_phase(engine, phase, ns))
        p = res["phases"][-1]
        print(phase, f"ttft {p['ttft_s']:.2f} s", "late chunks ms", p["late_chunks_ms"], flush=True)
        for s in p["streams"][:3]:
            print("  stream", s["stream"], {k: s[k] for k in ("num_kernels", "span_ms", "busy_ms")},
                  s["kernel_ms_by_kind"], s["gaps"], flush=True)  # fmt: skip
        ns.out.write_text(json.dumps(res, indent=1))
    engine.shutdown()


if __name__ == "__main__":
    main()
