"""Simulate the mixed scenario of `benchmarks/mixed_long_short.py` and compare with its measurement.

    python -m benchmarks.simulate_mixed --measured benchmarks/results/mixed_h200.json \
        --profile benchmarks/results/mixed_h200.profile.json --out OUT.json [--plot OUT.png] \
        [--device-latency-profile D]

For each configuration the measurement ran (every entry of its "runs": fixed64 ... fixed2048,
adaptive_fcfs, adaptive_lars), the simulated engine (the real scheduler in virtual time, step
times from the profile) is driven exactly as the benchmark drives `LLMEngine`: num_short short
prompts decode until each has 2 tokens, then the long prompt arrives; the long TTFT and the
shorts' token gaps until it are recorded. Without --profile the roofline of --gpu is used.
Runs on CPU.

Reported per configuration, simulated vs measured: long TTFT and short TBT p50/p99/max, the
relative error (simulated - measured) / measured and whether it is within --tolerance.
--profile is what the measured engine's policies predicted with (the run's own profile);
--device-latency-profile D, if given, is where the simulated device's step times come from
(the engine calibrates its --profile against them online, as on the GPU). The
measured side twice:

    all_gaps          the run's own figures (every gap of every short request)
    excluding_stalls  the run's TBT timeline (short request 0's gaps; all shorts share a step)
                      without gaps > --stall-threshold-s (host stalls such as a JIT compile
                      while serving), and the TTFT less each such gap's excess over the
                      timeline's median gap
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks.mixed_long_short import CONFIGS, pcts
from mnemosyne.bench.long_context.run import write_model_dir
from mnemosyne.engine.args import EngineArgs
from mnemosyne.latency.profile_store import load_profile
from mnemosyne.simulator.engine import SimulatedEngine, scaled_timer
from mnemosyne.simulator.setup import device_spec, latency_model_for, simulated_engine_config

METRICS = ("long_ttft_s", "p50_ms", "p99_ms", "max_ms")


def simulate_config(model_dir: Path, name: str, m: dict, ns: argparse.Namespace, step_timer=None,
                    online_calibration: bool = True) -> dict:  # fmt: skip
    """`step_timer(model)`: builds the simulated device's StepTimer (None: steps take the prediction)."""
    cfg = CONFIGS[name]  # (adaptive_lars_lane: the prefill lane, simulator/lane.py)
    args = EngineArgs(
        model=str(model_dir), max_num_batched_tokens=8192 + 256, max_num_seqs=256, enable_prefix_caching=False,
        chunk_policy=cfg["chunk_policy"], chunk_size=cfg["chunk_size"], scheduling_policy=cfg["scheduling_policy"],
        tbt_slo_ms=m["tbt_slo_ms"], latency_profile=ns.profile,
        online_calibration=online_calibration and cfg.get("online_calibration", True),
        tbt_slo_quantile=m.get("tbt_slo_quantile", 0.9),  # older runs predate the option: its default then
        prefill_lane_free_sms=m.get("prefill_lane_free_sms", 0) if cfg.get("prefill_lane") else 0,
        prefill_lane_max_free_sms=m.get("prefill_lane_max_free_sms"),
        prefill_lane_chunk_tokens=m.get("prefill_lane_chunk_tokens", EngineArgs.prefill_lane_chunk_tokens),
        prefill_lane_min_tokens=m.get("prefill_lane_min_tokens", EngineArgs.prefill_lane_min_tokens),
    )  # fmt: skip
    spec = device_spec(ns.gpu)
    config = simulated_engine_config(model_dir, args, spec)
    model, source = latency_model_for(config, spec)
    sim = SimulatedEngine(
        config, model, source, step_timer=None if step_timer is None else step_timer(model), gpu=spec
    )
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

    def in_prefill(r: str) -> list[tuple[float, float]]:  # (token time, gap) while the long prompt prefills
        t = sim.requests[r].token_times_s
        return [(b, b - a) for a, b in zip(t, t[1:], strict=False) if a >= t_arrival and b <= t_first]

    return {
        "config": name,
        "long_ttft_s": t_first - t_arrival,
        "short_tbt": pcts([g for r in shorts for _, g in in_prefill(r)]),
        "latency_model": source,
        "tbt_timeline": [[round(t - t_arrival, 4), round(g, 5)] for t, g in in_prefill(shorts[0])],
    }


def measured_sides(run: dict, stall_threshold_s: float) -> dict:
    """{"all_gaps": the run's figures, "excluding_stalls": its timeline without gaps > threshold}."""
    gaps = [g for _, g in run["tbt_timeline"]]
    stalls = [g for g in gaps if g > stall_threshold_s]
    median = statistics.median(gaps) if gaps else 0.0
    kept = [g for g in gaps if g <= stall_threshold_s]
    return {
        "all_gaps": {"long_ttft_s": run["long_ttft_s"], **run["short_tbt"]},
        "excluding_stalls": {
            "long_ttft_s": run["long_ttft_s"] - sum(g - median for g in stalls),
            **pcts(kept),
            "num_stalls": len(stalls),
            "stalls_s": [round(g, 3) for g in stalls],
            "source": "tbt_timeline (short request 0)",
        },
    }


def compare(sim: dict, meas: dict, tolerance: float) -> dict:
    """Per metric: simulated, measured, relative error (sim - meas) / meas, within tolerance."""
    s = {"long_ttft_s": sim["long_ttft_s"], **sim["short_tbt"]}
    out = {}
    for k in METRICS:
        if meas.get(k) and s.get(k) is not None:
            rel = (s[k] - meas[k]) / meas[k]
            out[k] = {
                "simulated": s[k],
                "measured": meas[k],
                "rel_error": rel,
                "within": abs(rel) <= tolerance,
            }
    return out


def plot(rows: list[dict], measured: dict, path: Path, device_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(rows)
    fig = plt.figure(figsize=(4 * n, 8))
    grid = fig.add_gridspec(2, n)
    for i, (row, run) in enumerate(zip(rows, measured["runs"], strict=True)):
        ax = fig.add_subplot(grid[0, i])
        for tl, label, kw in (
            (run["tbt_timeline"], "measured (H200)", {"color": "C0"}),
            (row["simulated"]["tbt_timeline"], "simulated", {"color": "C1", "ls": "--"}),
        ):
            ax.plot([t for t, _ in tl], [1e3 * g for _, g in tl], lw=0.8, label=label, **kw)
        ax.axhline(measured["args"]["tbt_slo_ms"], color="k", ls=":", lw=0.8)
        ax.set(
            title=row["config"],
            xlabel="s since the long prompt arrived",
            ylabel="short TBT (ms)",
            yscale="log",
        )
        ax.legend(fontsize=7)
    ax = fig.add_subplot(grid[1, :])
    width = 0.8 / len(METRICS)
    for j, k in enumerate(METRICS):
        for side, marker in (("all_gaps", "o"), ("excluding_stalls", "x")):
            ys = [
                100 * r["vs_" + side][k]["rel_error"] if k in r["vs_" + side] else float("nan") for r in rows
            ]
            xs = [i + (j - 1.5) * width for i in range(n)]
            ax.scatter(
                xs, [max(y, -45) for y in ys], marker=marker, color=f"C{j}", label=f"{k} ({side})", s=22
            )
            for x, y in zip(xs, ys, strict=True):
                if y < -45:  # off the axis: written beside its clipped marker
                    ax.annotate(f"{y:.0f}%", (x, -45), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhspan(-10, 10, color="g", alpha=0.12, label="within 10%")
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks(range(n), [r["config"] for r in rows])
    ax.set_ylim(-48, 25)
    ax.set(ylabel="(simulated - measured) / measured (%)", title="simulated vs measured")
    ax.legend(fontsize=6, ncol=2)
    fig.suptitle(f"mixed scenario on 1x H200: measured vs SIMULATED (CPU; device: {Path(device_name).name})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--measured", type=Path, required=True, help="JSON written by benchmarks.mixed_long_short"
    )
    ap.add_argument("--profile", default=None, help="the latency profile it measured (.profile.json)")
    ap.add_argument("--device-latency-profile", default=None, help="the simulated device's step times")
    ap.add_argument(
        "--chunk-step-factor", type=float, default=1.0,
        help="simulated steps with a chunk take this x the device's time (sustained clocks: "
        "`mnemosyne simulate --chunk-step-factor`)",
    )  # fmt: skip
    ap.add_argument("--gpu", default="h200")
    ap.add_argument("--tolerance", type=float, default=0.10, help="relative error counted as agreement")
    ap.add_argument("--stall-threshold-s", type=float, default=1.0, help="measured gaps above: host stalls")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--plot", type=Path, default=None)
    ns = ap.parse_args()
    measured = json.loads(ns.measured.read_text())
    m = measured["args"]
    rows = []
    timer = None
    if ns.device_latency_profile is not None:
        device = load_profile(ns.device_latency_profile)
        if ns.profile is not None and load_profile(ns.profile).key != device.key:
            raise SystemExit(f"{ns.device_latency_profile} was measured for another key than {ns.profile}")
        timer = lambda _engine_model: scaled_timer(device.model, 1.0, ns.chunk_step_factor)  # noqa: E731
    elif ns.chunk_step_factor != 1.0:
        timer = lambda engine_model: scaled_timer(engine_model, 1.0, ns.chunk_step_factor)  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model_dir(m["shape"], Path(tmp))
        for run in measured["runs"]:
            sim = simulate_config(model_dir, run["config"], m, ns, step_timer=timer)
            sides = measured_sides(run, ns.stall_threshold_s)
            row = {
                "config": run["config"],
                "measured": sides,
                "measured_step_time_ratio_p50": run.get("step_time_ratio_p50"),  # predicted/actual
                "simulated": sim,
                **{f"vs_{side}": compare(sim, sides[side], ns.tolerance) for side in sides},
            }
            rows.append(row)
            print(json.dumps({"config": row["config"], **{
                side: {k: f"{v['rel_error']:+.1%}" for k, v in row[f"vs_{side}"].items()} for side in sides}}),
                flush=True)  # fmt: skip
    ns.out.write_text(json.dumps({
        "SIMULATED": "simulated side on CPU; measured side: the --measured H200 run",
        "command": "python -m benchmarks.simulate_mixed " + shlex.join(sys.argv[1:]),
        "simulated_vs_measured": rows, "measured_file": str(ns.measured), "profile": ns.profile,
        "device_latency_profile": ns.device_latency_profile or ns.profile, "chunk_step_factor": ns.chunk_step_factor,
        "tolerance": ns.tolerance, "stall_threshold_s": ns.stall_threshold_s,
    }, indent=1))  # fmt: skip
    if ns.plot:
        plot(rows, measured, ns.plot, ns.device_latency_profile or ns.profile or f"roofline {ns.gpu}")


if __name__ == "__main__":
    main()
