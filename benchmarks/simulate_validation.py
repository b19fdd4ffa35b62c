"""The simulator against the session-4 H200 measurements, once per profile measurement mode.

    python -m benchmarks.simulate_validation --out-dir benchmarks/results/simulated/validation_session5 \
        [--plot benchmarks/results/simulated/validation_session5.png]

CPU only, about 3 minutes. The engine's policies predict with the profile the measured runs
used (`--engine-profile`, the session-4 quick profile) and calibrate it online, as on the GPU;
the simulated device's step times come from each of the four session-5 profiles of the same
engine shape (`benchmarks/profile_measurement_modes.py`: contiguous / scattered block tables,
serial / pipelined step timing). Per mode it runs `benchmarks.simulate_mixed` on the mixed
scenario (and its min16 rerun) and `benchmarks.compare_serving_trace` on the serving trace,
then writes OUT/summary.json: per config and metric the measured value and each mode's
simulated value and relative error (simulated - measured) / measured, and for the fixed-chunk
mixed runs (whose steps are known: 32 decodes + one chunk after i chunks) each step's measured
token gap beside each mode's prediction of that step.

On a run of `benchmarks.simulate_validation_measure` (profiles and scenario measured on one
lease and one code, every step's composition and time recorded):

    python -m benchmarks.simulate_validation --measured-run RUN/mixed_long_short.json \
        --run-profiles RUN/latency_profile_quick_contiguous_pipelined.json,... --out-dir OUT

runs `benchmarks.simulate_mixed` with the run's own profile as the engine's and each of
--run-profiles as the device, and reports per config and step kind each profile's error on
the engine's own steps: measured time (result - max(submitted, previous result)) against the
profile's prediction of that step's composition.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from mnemosyne.latency.composition import GroupLoad, StepComposition
from mnemosyne.latency.profile_store import load_profile

R = "benchmarks/results"
MODES = ("contiguous_serial", "scattered_serial", "contiguous_pipelined", "scattered_pipelined")
MIXED = {"mixed": f"{R}/mixed_long_short_h200_2026-11-29_session4.json",
         "mixed_min16": f"{R}/mixed_long_short_h200_2026-11-29_session4_min16.json"}  # fmt: skip
SERVING = f"{R}/serving_trace_8b_h200_2026-11-29_session4/serving_trace.json"
MIXED_METRICS = ("long_ttft_s", "p50_ms", "p99_ms", "max_ms")
SERVING_METRICS = ("ttft_short_p50_ms", "ttft_short_p99_ms", "ttft_long_p50_ms", "ttft_long_p99_ms",
                   "tbt_short_p50_ms", "tbt_short_p99_ms")  # fmt: skip


def mode_profile(mode: str) -> str:
    return f"{R}/latency_profile_quick_{mode}_h200_2026-11-29_session5.json"


def run(cmd: list[str]) -> str:
    print("$ " + shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return shlex.join(cmd)


def fixed_step(chunk: int, prefix: int, num_decodes: int, decode_kv: int) -> StepComposition:
    g = GroupLoad()
    for _ in range(num_decodes):
        g = g.plus_decode(decode_kv)
    return StepComposition.single(g.plus_chunk(chunk, prefix))


def step_residuals(measured: dict, models: dict) -> dict:
    """Fixed-chunk runs: step i after the long prompt arrived is 32 decodes (about 1024 + i keys)
    + chunk i (after i * chunk keys); its measured token gap beside each model's prediction."""
    out = {}
    n_dec, short_len = measured["args"]["num_short"], measured["args"]["short_len"]
    for run_ in measured["runs"]:
        c = run_.get("chunk_size")
        if run_["chunk_policy"] != "fixed" or not c:
            continue
        tl = run_["tbt_timeline"]
        idx = sorted({*range(6), *range(0, len(tl), max(1, len(tl) // 16)), len(tl) - 1})
        rows = []
        for i in idx:
            comp = fixed_step(c, c * i, n_dec, short_len + 2 + i)
            pred = {m: round(1e3 * model.step_time_s(comp), 2) for m, model in models.items()}
            rows.append({"step": i, "prefix": c * i, "measured_ms": round(1e3 * tl[i][1], 2), "predicted_ms": pred})
        total = {m: round(sum(model.step_time_s(fixed_step(c, c * i, n_dec, short_len + 2 + i))
                              for i in range(len(tl) + 1)), 2) for m, model in models.items()}  # fmt: skip
        out[run_["config"]] = {"steps": rows, "sum_of_predicted_steps_s": total, "measured_ttft_s": run_["long_ttft_s"]}
    return out


def recorded_step_errors(run_: dict, models: dict) -> dict:
    """Per step kind (decode_only / with_chunk): each model's predicted / measured seconds of the
    engine's own steps (median, p10, p90) and the sums over the steps."""
    rows, last = [], None
    for submitted, done, _, load in run_["steps"]:
        measured = done - (submitted if last is None else max(submitted, last))
        last = done
        g = GroupLoad(**{**load, "chunk_shapes": tuple(tuple(x) for x in load["chunk_shapes"])})
        kind = "with_chunk" if g.num_chunks else "decode_only"
        rows.append((kind, measured, {m: model.step_time_s(StepComposition.single(g)) for m, model in models.items()}))
    out = {}
    for kind in ("decode_only", "with_chunk"):
        sel = [r for r in rows if r[0] == kind and r[1] > 0]
        if not sel:
            continue
        out[kind] = {"num_steps": len(sel), "measured_s": round(sum(r[1] for r in sel), 4)}
        for m in models:
            ratios = sorted(r[2][m] / r[1] for r in sel)
            out[kind][m] = {
                "predicted_s": round(sum(r[2][m] for r in sel), 4),
                "ratio_p10_p50_p90": [round(ratios[int(q * (len(ratios) - 1))], 3) for q in (0.1, 0.5, 0.9)],
            }
    return out


def validate_recorded_run(ns: argparse.Namespace) -> int:
    """The --measured-run mode (module docstring)."""
    measured = json.loads(ns.measured_run.read_text())
    engine_profile = measured["args"]["profile"]
    if not Path(engine_profile).exists():  # recorded on the GPU host: look beside the run's JSON
        engine_profile = str(ns.measured_run.parent / Path(engine_profile).name)
    profiles = {Path(p).stem: p for p in ns.run_profiles.split(",")}
    py, commands, table = sys.executable, [], {}
    for name, dev in profiles.items():
        out = ns.out_dir / f"mixed_{name}.json"
        commands.append(run([py, "-m", "benchmarks.simulate_mixed", "--measured", str(ns.measured_run), "--profile",
                             engine_profile, "--device-latency-profile", dev, "--out", str(out)]))  # fmt: skip
        for row in json.loads(out.read_text())["simulated_vs_measured"]:
            for k in MIXED_METRICS:
                v = row["vs_all_gaps"][k]
                cell = table.setdefault(row["config"], {}).setdefault(k, {"measured": v["measured"]})
                cell[name] = {"simulated": v["simulated"], "rel_error": v["rel_error"]}
    models = {name: load_profile(p).model for name, p in profiles.items()}
    summary = {
        "SIMULATED": "simulated side on CPU; measured side: " + str(ns.measured_run),
        "command": "python -m benchmarks.simulate_validation " + shlex.join(sys.argv[1:]),
        "commands": commands, "engine_profile": engine_profile, "device_profiles": profiles,
        "rel_error_table": table,
        "recorded_step_errors": {r["config"]: recorded_step_errors(r, models) for r in measured["runs"] if r.get("steps")},
    }  # fmt: skip
    (ns.out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {ns.out_dir / 'summary.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, required=True)
    ap.add_argument("--engine-profile", default=f"{R}/latency_profile_quick_h200_2026-11-29_session4.json")
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--measured-run", type=Path, default=None, help="a simulate_validation_measure result")
    ap.add_argument("--run-profiles", default=None, help="comma-separated profiles measured in that run")
    ns = ap.parse_args(argv)
    ns.out_dir.mkdir(parents=True, exist_ok=True)
    if ns.measured_run is not None:
        if not ns.run_profiles:
            raise SystemExit("--measured-run needs --run-profiles")
        return validate_recorded_run(ns)
    py = sys.executable
    commands, table = [], {}
    for mode in MODES:
        dev = mode_profile(mode)
        for tag, path in MIXED.items():
            out = ns.out_dir / f"{tag}_{mode}.json"
            commands.append(run([py, "-m", "benchmarks.simulate_mixed", "--measured", path, "--profile",
                                 ns.engine_profile, "--device-latency-profile", dev, "--out", str(out)]))  # fmt: skip
            for row in json.loads(out.read_text())["simulated_vs_measured"]:
                for k in MIXED_METRICS:
                    v = row["vs_all_gaps"][k]
                    cell = table.setdefault(f"{tag}/{row['config']}", {}).setdefault(k, {"measured": v["measured"]})
                    cell[mode] = {"simulated": v["simulated"], "rel_error": v["rel_error"]}
        out = ns.out_dir / f"serving_{mode}.json"
        commands.append(run([py, "-m", "benchmarks.compare_serving_trace", "--measured", SERVING,
                             "--latency-profile", ns.engine_profile, "--device-latency-profile", dev,
                             "--out", str(out)]))  # fmt: skip
        for config, metrics in json.loads(out.read_text())["simulated_vs_measured"].items():
            for k in SERVING_METRICS:
                v = metrics[k]
                cell = table.setdefault(f"serving/{config}", {}).setdefault(k, {"measured": v["measured"]})
                cell[mode] = {"simulated": v["simulated"], "rel_error": v["rel_error"]}
    models = {m: load_profile(mode_profile(m)).model for m in MODES}
    models["session4_serial"] = load_profile(ns.engine_profile).model
    summary = {
        "SIMULATED": "simulated side on CPU (`mnemosyne simulate`'s engine); measured side: the session-4 "
        "H200 runs named below",
        "command": "python -m benchmarks.simulate_validation " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "commands": commands,
        "engine_profile": ns.engine_profile,
        "device_profiles": {m: mode_profile(m) for m in MODES},
        "measured": {**MIXED, "serving": SERVING},
        "rel_error_table": table,
        "fixed_chunk_step_residuals": step_residuals(json.loads(Path(MIXED["mixed"]).read_text()), models),
    }
    (ns.out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {ns.out_dir / 'summary.json'}")
    if ns.plot:
        plot(table, ns.plot)
    return 0


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(cfg, k) for cfg, metrics in table.items() for k in metrics]
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(rows) + 1.5))
    for j, mode in enumerate(MODES):
        xs = [100 * table[cfg][k][mode]["rel_error"] for cfg, k in rows]
        ys = [i + (j - 1.5) * 0.18 for i in range(len(rows))]
        ax.scatter([max(-80, min(60, x)) for x in xs], ys, s=14, label=mode, color=f"C{j}")
    ax.axvspan(-10, 10, color="g", alpha=0.12, label="within 10%")
    ax.axvline(0, color="k", lw=0.6)
    ax.set_yticks(range(len(rows)), [f"{cfg} {k}" for cfg, k in rows], fontsize=6)
    ax.invert_yaxis()
    ax.set_xlim(-82, 62)
    ax.set(xlabel="(simulated - measured) / measured (%), clipped to [-80, 60]",
           title="SIMULATED vs session-4 H200 runs: engine predicts with the run's profile, device = each mode's profile")  # fmt: skip
    ax.title.set_fontsize(8)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
