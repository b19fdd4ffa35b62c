"""What the first step of a prompt that arrives while a request decodes costs that request's
next token (1x GPU).

The 1B serving trace with graph-sized steps logs a decode-only step of 10-14 ms (predicted
1.3) right before a new prompt's first chunk of 992 tokens through the piecewise graphs,
which then reads early: the chunk's launch held the engine's thread before it read the
decode's token (`benchmarks/results/session15_h200_2026-11-30/a/`). This probe builds the
engine as that server does (random weights of --shape, bf16, async scheduling, adaptive
chunks in LARS order with --latency-profile, graph-sized steps, a step log), starts one
request decoding, then adds prompts of --sizes tokens one at a time. For each arrival: the
wall time of every engine.step() call until the prompt's first token, and cProfile
(cumulative and own time) and torch.profiler (host time per op and CUDA runtime call) of
the call that launches its first chunk. The step log of the whole run is written beside --out.

    python -m benchmarks.probes.arrival_launch_hold --out OUT.json [--shape llama3.2-1b]
        [--latency-profile P] [--sizes 1206,1372,2384,992] [--replay-timeline]

With --replay-timeline, each arrival also gets the host and device times of every CUDA graph
replay from two decode-only calls before it to its last token (`replay_timeline.py`), and
torch.profiler is not run.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from benchmarks.probes.replay_timeline import ReplayTimeline
from mnemosyne.bench.long_context.engine import random_prompt
from mnemosyne.bench.long_context.run import write_model_dir
from mnemosyne.engine.args import EngineArgs
from mnemosyne.engine.llm_engine import LLMEngine
from mnemosyne.sampling_params import SamplingParams
from mnemosyne.wire.plan import StepPlan
from mnemosyne.worker import mixed_graph
from mnemosyne.worker.worker import Worker


def _profile_table(profile: cProfile.Profile, sort: str, rows: int) -> str:
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats(sort).print_stats(rows)
    return out.getvalue()


def _arrival(
    engine: LLMEngine, num_tokens: int, seed: int, rows: int, timeline: ReplayTimeline | None, profiled: bool
) -> dict:
    vocab = engine.config.model.vocab_size
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    if timeline is not None:
        timeline.start(engine.executor.worker.piecewise)
        for i in range(2):  # decode-only calls before the arrival, for comparison
            timeline.mark(f"before.{i}")
            engine.step()
    rid = engine.add_request(random_prompt(num_tokens, seed=seed, max_id=vocab), params)
    engine.take_step_stats()
    calls: list[dict] = []
    launch_profile: cProfile.Profile | None = None
    first_token = False
    torch_table = ""
    while not first_token:
        profile = cProfile.Profile()
        first_call = launch_profile is None
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        use_tracer = profiled and first_call and torch.cuda.is_available() and timeline is None
        tracer = torch.profiler.profile(activities=activities) if use_tracer else None
        if tracer is not None:
            tracer.__enter__()
        if timeline is not None:
            timeline.mark(f"call.{len(calls)}")
        t0 = time.perf_counter()
        if profiled:
            profile.enable()
        outputs = engine.step()
        if profiled:
            profile.disable()
        wall_ms = 1e3 * (time.perf_counter() - t0)
        if tracer is not None:
            tracer.__exit__(None, None, None)
            torch_table = tracer.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
        stats = engine.take_step_stats()
        calls.append({
            "wall_ms": round(wall_ms, 3),
            "steps": [{"measured_ms": round(1e3 * s.actual_s, 3), "predicted_ms": round(1e3 * s.predicted_s, 3),
                       "chunks": list(s.chunk_sizes)} for s in stats],
        })  # fmt: skip
        if launch_profile is None:
            launch_profile = profile  # the call that schedules and submits the prompt's first chunk
        first_token = any(o.request_id == rid and len(o.token_ids) > 0 for o in outputs)
    if timeline is not None:
        timeline.mark("rest")
    while any(o.request_id == rid and not o.finished for o in engine.step()):
        pass
    assert launch_profile is not None
    return {
        **({"replay_timeline": timeline.stop()} if timeline is not None else {}),
        "tokens": num_tokens,
        "calls": calls,
        "launch_call_cumulative": _profile_table(launch_profile, "cumulative", rows) if profiled else "",
        "launch_call_tottime": _profile_table(launch_profile, "tottime", rows) if profiled else "",
        "launch_call_torch_profiler": torch_table,  # CUDA runtime calls (graph launches, copies, syncs) by host time
    }


def _hold_before_piecewise(self: Worker, plan: StepPlan) -> bool:
    """`Worker.reports_previous_first` for every plan that is not one graph replay (the
    worker's rule: only plans over the piecewise graphs' size)."""
    if self.device.type != "cuda" or not self._previous_decode_only or plan.is_decode_only:
        return False
    return self.mixed is None or plan.num_batched_tokens > self.mixed.max_tokens


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shape", default="llama3.2-1b")
    ap.add_argument("--latency-profile", default=None)
    ap.add_argument("--sizes", default="1206,1372,2384,992")
    ap.add_argument("--rows", type=int, default=30)
    ap.add_argument("--replay-timeline", action="store_true",
                    help="time every CUDA graph replay on the host and the device, on one clock (no torch.profiler)")
    ap.add_argument("--no-profile", action="store_true", help="wall times only: no cProfile, no torch.profiler")
    ap.add_argument("--num-decoding", type=int, default=1, help="requests decoding before the arrivals")
    ap.add_argument("--max-mixed-graph-tokens", type=int, default=None,
                    help="A/B: the mixed-step graphs' largest step instead of the worker's")
    ap.add_argument("--hold-before-piecewise", action="store_true",
                    help="A/B: report a decode-only plan before launching any plan that is not one graph replay")
    ns = ap.parse_args(argv)
    if ns.max_mixed_graph_tokens is not None:
        mixed_graph.MAX_MIXED_GRAPH_TOKENS = ns.max_mixed_graph_tokens
    if ns.hold_before_piecewise:
        Worker.reports_previous_first = _hold_before_piecewise  # type: ignore[method-assign]
    model_dir = write_model_dir(ns.shape, Path(tempfile.mkdtemp()))
    step_log = ns.out.with_suffix(".steps.jsonl")
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    engine = LLMEngine.from_args(
        EngineArgs(
            model=str(model_dir), load_format="dummy", dtype="bfloat16", max_num_batched_tokens=8448,
            max_model_len=65536, enable_prefix_caching=False, chunk_policy="adaptive", scheduling_policy="lars",
            latency_profile=ns.latency_profile, step_log=str(step_log),
        )
    )  # fmt: skip
    vocab = engine.config.model.vocab_size
    decoding = SamplingParams(temperature=0, max_tokens=32_768, ignore_eos=True)
    for i in range(ns.num_decoding):
        engine.add_request(random_prompt(1024, seed=1 + i, max_id=vocab), decoding)
    for _ in range(64 + 2 * ns.num_decoding):  # its prefill, then decodes in the CUDA graphs
        engine.step()
    use_timeline = ns.replay_timeline and torch.cuda.is_available()
    sizes = [int(x) for x in ns.sizes.split(",")]
    if use_timeline:
        torch.cuda.profiler.start()  # the capture range of an outside profiler (nsys --capture-range=cudaProfilerApi)
    arrivals = [
        _arrival(engine, n, 10 + i, ns.rows, ReplayTimeline() if use_timeline else None, not ns.no_profile)
        for i, n in enumerate(sizes)
    ]
    if use_timeline:
        torch.cuda.profiler.stop()
    for a in arrivals:
        print(json.dumps({k: v for k, v in a.items() if k == "tokens" or k == "calls"}), flush=True)
    result = {
        "benchmark": "arrival_launch_hold",
        "command": "python -m benchmarks.probes.arrival_launch_hold " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "shape": ns.shape,
        "capture_s": engine.executor.worker.capture_s,
        "step_log": step_log.name,
        "arrivals": arrivals,
    }
    ns.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
