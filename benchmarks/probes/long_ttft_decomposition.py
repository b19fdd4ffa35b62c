"""Where a long prompt's TTFT goes in the serving trace, SIMULATED (CPU).

Replays `benchmarks.serving_trace`'s trace through `mnemosyne simulate` (as
`benchmarks.simulate_serving_trace`, one configuration) and splits each long request's
time from arrival to first token over the steps of that interval:

    with decodes     steps that hold one of its chunks and a decode: held to the TBT target
    prefill only     steps that hold one of its chunks and no decode: the prefill-only target
    not scheduled    steps without any chunk of it (other prompts took the step: LARS order,
                     one long prefill per KVP group)

with its tokens and rate in each kind, beside its prefill floor (the trace's floor: FLOPs
at peak). A prediction, not a measurement.

    python -m benchmarks.probes.long_ttft_decomposition --out OUT.json --latency-profile P \
        [--chunk-step-factor F] [--idle-step-factor F] [serving_trace options: --shape 8b --rate 0.12 ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from benchmarks import serving_trace
from benchmarks.serving_trace_data import make_trace, ttft_deadlines_s
from benchmarks.simulate_serving_trace import simulate_argv
from mnemosyne.bench.long_context.run import write_model_dir
from mnemosyne.cli import build_parser, parse_args
from mnemosyne.simulator.command import add_step_factor_args, run_simulation
from mnemosyne.simulator.engine import SimulatedEngine


def decompose(engine: SimulatedEngine, floors: dict[str, float], long_ids: set[str]) -> list[dict]:
    """Each long request's TTFT over the steps between its arrival and first token
    (`engine.steps`; a 1-token chunk at or past a prompt's end is a decode)."""
    assert engine.steps is not None
    steps = [
        (rec.done_s, rec.chunks, sum(1 for rid, start, n in rec.chunks
                                     if n == 1 and start >= engine.requests[rid].prompt_len))
        for rec in engine.steps
    ]  # fmt: skip
    rows = []
    for rid, r in engine.requests.items():
        if rid not in long_ids or not r.token_times_s:
            continue
        first = r.token_times_s[0]
        parts = {"with_decodes": [0.0, 0], "prefill_only": [0.0, 0], "not_scheduled": [0.0, 0]}
        prev = 0.0
        for done, chunks, num_decodes in steps:
            start, prev = max(prev, r.arrival_s), done  # the step's time inside the window
            if done <= r.arrival_s or done > first + 1e-9:
                continue
            dur = done - start
            mine = [n for q, s0, n in chunks if q == rid and s0 < r.prompt_len]
            kind = "not_scheduled" if not mine else ("with_decodes" if num_decodes else "prefill_only")
            parts[kind][0] += dur
            parts[kind][1] += sum(mine)
        rows.append({
            "request": rid, "prompt_tokens": r.prompt_len, "ttft_s": first - r.arrival_s,
            "prefill_floor_s": floors[rid],
            **{f"{k}_s": v[0] for k, v in parts.items()},
            **{f"{k}_tokens": v[1] for k, v in parts.items() if k != "not_scheduled"},
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> dict:
    own_ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    own_ap.add_argument("--out", type=Path, required=True)
    own_ap.add_argument("--gpu", default="h200")
    own_ap.add_argument("--kv-cache-memory-gb", type=float, default=None)
    add_step_factor_args(own_ap)
    own_ap.add_argument("--config", default="lars_adaptive")
    argv = list(sys.argv[1:] if argv is None else argv)
    own, rest = own_ap.parse_known_args(argv)
    own.device_latency_profile = None
    with tempfile.TemporaryDirectory(prefix="long_ttft_") as tmp:
        ns = serving_trace.parse_args([*rest, "--dry-run", "--out", tmp])
        serving_trace.main([*rest, "--dry-run", "--out", tmp])
        trace = make_trace(serving_trace.trace_spec(ns))
        model_dir = ns.model_dir or write_model_dir(serving_trace.SHAPE_NAMES[ns.shape], Path(tmp))
        floors = {f"req-{i}": f for i, (f, _) in enumerate(ttft_deadlines_s(Path(model_dir), trace, 1.0, 0.0))}
        sim_argv = simulate_argv(ns, own, own.config, Path(model_dir), Path(tmp) / "trace.jsonl")
        engine, _ = run_simulation(parse_args(build_parser(), sim_argv), record_steps=True)
    long_ids = {f"req-{i}" for i, t in enumerate(trace) if t["kind"] == "long"}
    rows = decompose(engine, floors, long_ids)
    for row in rows:
        print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}))
    result = {
        "SIMULATED": "a prediction of `mnemosyne simulate` on CPU, not a measurement",
        "command": "python -m benchmarks.probes.long_ttft_decomposition " + " ".join(argv),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": own.config,
        "requests": rows,
    }
    own.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
