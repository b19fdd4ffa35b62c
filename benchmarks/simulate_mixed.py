"""Simulate the mixed scenario of `benchmarks/mixed_long_short.py` and compare with its measurement.

    python -m benchmarks.simulate_mixed --measured benchmarks/results/mixed_h200.json \
        --profile benchmarks/results/mixed_h200.profile.json --out OUT.json

For each configuration the measurement ran (fixed512, fixed2048, adaptive_fcfs, adaptive_lars),
the simulated engine (the real scheduler in virtual time, step times from the profile) is
driven exactly as the benchmark drives `LLMEngine`: num_short short prompts decode until each
has 2 tokens, then the long prompt arrives; the long TTFT and the shorts' token gaps until it
are recorded. Prints measured vs simulated (ratio: simulated / measured). Without --profile
the roofline of --gpu is used. Runs on CPU.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks.mixed_long_short import CONFIGS, pcts
from mnemosyne.bench.long_context.run import write_model_dir
from mnemosyne.engine.args import EngineArgs
from mnemosyne.simulator.engine import SimulatedEngine
from mnemosyne.simulator.setup import device_spec, latency_model_for, simulated_engine_config


def simulate_config(model_dir: Path, name: str, m: dict, ns: argparse.Namespace) -> dict:
    cfg = CONFIGS[name]
    args = EngineArgs(
        model=str(model_dir), max_num_batched_tokens=8192 + 256, max_num_seqs=256, enable_prefix_caching=False,
        chunk_policy=cfg["chunk_policy"], chunk_size=cfg["chunk_size"], scheduling_policy=cfg["scheduling_policy"],
        tbt_slo_ms=m["tbt_slo_ms"], latency_profile=ns.profile,
    )  # fmt: skip
    spec = device_spec(ns.gpu)
    config = simulated_engine_config(model_dir, args, spec)
    model, source = latency_model_for(config, spec)
    sim = SimulatedEngine(config, model, source)
    shorts = [f"short-{i}" for i in range(m["num_short"])]
    for rid in shorts:
        sim.add_request(rid, m["short_len"], m["short_max_tokens"])
    while any(len(sim.requests[r].token_times_s) < 2 for r in shorts):
        sim.step()
    t_arrival = sim.now_s
    sim.add_request("long", m["long_len"], 1)
    while not sim.requests["long"].token_times_s:
        sim.step()
    t_first = sim.requests["long"].token_times_s[0]
    gaps = [
        b - a
        for r in shorts
        for a, b in zip(sim.requests[r].token_times_s, sim.requests[r].token_times_s[1:], strict=False)
        if a >= t_arrival and b <= t_first
    ]
    return {
        "config": name,
        "long_ttft_s": t_first - t_arrival,
        "short_tbt": pcts(gaps),
        "latency_model": source,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--measured", type=Path, required=True, help="JSON written by benchmarks.mixed_long_short"
    )
    ap.add_argument("--profile", default=None, help="the latency profile it measured (.profile.json)")
    ap.add_argument("--gpu", default="h200")
    ap.add_argument("--out", type=Path, required=True)
    ns = ap.parse_args()
    measured = json.loads(ns.measured.read_text())
    m = measured["args"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model_dir(m["shape"], Path(tmp))
        for run in measured["runs"]:
            sim = simulate_config(model_dir, run["config"], m, ns)
            row = {
                "config": run["config"],
                "measured": {"long_ttft_s": run["long_ttft_s"], "short_tbt": run["short_tbt"]},
                "simulated": sim,
                "ratio": {
                    "long_ttft": sim["long_ttft_s"] / run["long_ttft_s"],
                    **{
                        k: sim["short_tbt"].get(k, 0) / run["short_tbt"][k]
                        for k in ("p50_ms", "p99_ms")
                        if run["short_tbt"].get(k)
                    },
                },
            }
            rows.append(row)
            print(json.dumps({"config": row["config"], **row["ratio"]}), flush=True)
    ns.out.write_text(
        json.dumps({"simulated_vs_measured": rows, "measured_file": str(ns.measured)}, indent=1)
    )


if __name__ == "__main__":
    main()
