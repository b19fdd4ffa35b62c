"""The steps' latency model beside a prefill lane chunk (`mnemosyne/latency/beside_lane.py`)
against the steps a GPU ran beside one: the decode-only steps of lane runs' step logs, each
with the SMs it was confined to.

    python -m benchmarks.beside_lane_fit --out OUT.json [--run NAME=STEPLOG:PROFILE[:boxes] ...] [--only-given]

For each run and split: measured, the model's prediction (E_WEIGHTS, the keys' rate of the
run's decode launch, m = 1) and the one-rate model it replaced (base x max(1, N / (S x 2.1)));
the relative errors' median and p90. Then the grid of (E_WEIGHTS, E_KEYS) pairs that minimise
the sum over the runs whose decode kernel gathered its keys by pointers of median + p90 / 2;
with that E_WEIGHTS, the E_KEYS_BOXES of the runs whose kernel loaded TMA boxes; then, on the
steps with a chunk, the E_CHUNKS (the chunks' FLOPs against an average SM's share of the peak)
that minimises the same. The model's constants come from these fits. Runs on CPU.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import statistics
from collections import defaultdict
from pathlib import Path

from mnemosyne.latency.beside_lane import E_CHUNKS, E_KEYS, E_KEYS_BOXES, E_WEIGHTS, BesideLaneLatencyModel
from mnemosyne.latency.composition import StepComposition
from mnemosyne.latency.profile_store import load_profile
from mnemosyne.latency.roofline import H200, compute_s, weights_read_s
from mnemosyne.simulator.device_log import seqs_composition

P8B = (
    "benchmarks/results/serving_trace_session9_h200_2026-11-30/run1_8b_1b_mixed/latency_profile_quick_8b.json"
)
P1B = "benchmarks/results/serving_trace_session8_h200_2026-11-29/before/latency_profile_quick_1b.json"
R = "benchmarks/results"
# name: (step log, the profile the run predicted with, its decode kernel on a split loaded TMA
# boxes); the serving traces' steps beside a chunk are mostly weight reads
RUNS = {
    "session25_b_8b_serving_trace": (f"{R}/session25_h200_2026-12-02/b/runs/lars_adaptive_lane.steps.jsonl.gz", P8B, False),
    "session26_c_8b_serving_trace": (f"{R}/session26_h200_2026-12-02/c/runs/lars_adaptive_lane.steps.jsonl.gz", P8B, False),
    "session26_e_8b_mixed": (f"{R}/session26_h200_2026-12-02/e/mixed_8b_lane_steps.jsonl.gz", P8B, False),
    "session25_c_1b_mixed": (f"{R}/session25_h200_2026-12-02/c/mixed_1b_lane_steps.jsonl.gz", P1B, False),
    "session29_d_8b_mixed": (f"{R}/session29_h200_2026-12-03/d/mixed_8b_lane_steps.jsonl.gz", P8B, True),
}
ONE_RATE = 2.1  # the model before: one rate for the whole decode step


def beside_steps(step_log: str) -> tuple[list[dict], list[dict]]:
    """The steps beside a lane chunk, with the SMs they ran on: (decode-only, with a chunk)."""
    opener = gzip.open if step_log.endswith(".gz") else open
    with opener(step_log, "rt") as f:
        lines = [json.loads(line) for line in f][1:]
    beside = [s for s in lines if s.get("beside_lane") and s.get("steps_sms")]
    with_chunk = [any(n > 1 for n, _ in s["seqs"]) for s in beside]
    return [s for s, c in zip(beside, with_chunk) if not c], [s for s, c in zip(beside, with_chunk) if c]


def errors(pairs: list[tuple[float, float]]) -> tuple[float, float]:
    """Median and p90 of |predicted / measured - 1|."""
    e = sorted(abs(p / m - 1) for m, p in pairs)
    return e[len(e) // 2], e[int(len(e) * 0.9)]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument(
        "--run", action="append", default=[],
        help="NAME=STEPLOG:PROFILE, with :boxes when its decode kernel loaded TMA boxes (default: the committed runs)",
    )  # fmt: skip
    ap.add_argument("--only-given", action="store_true", help="fit the --run runs alone, not the committed ones")
    ns = ap.parse_args(argv)
    runs = {} if ns.only_given else dict(RUNS)
    for spec in ns.run:
        name, _, rest = spec.partition("=")
        boxes = rest.endswith(":boxes")
        log, _, profile = rest.removesuffix(":boxes").rpartition(":")
        runs[name] = (log, profile, boxes)
    num_sms = H200.num_sms
    # per run: its model (the constants' rates) and its steps (SMs, measured seconds, composition)
    data: dict[str, tuple[BesideLaneLatencyModel, list[tuple[int, float, StepComposition]]]] = {}
    chunk_data: dict[str, list[tuple[int, float, StepComposition]]] = {}  # the steps with a chunk
    boxes_runs = {name for name, (_, _, boxes) in runs.items() if boxes}
    for name, (log, path, boxes) in runs.items():
        profile = load_profile(path)
        shape = profile.key.shape
        model = BesideLaneLatencyModel(
            profile.model,
            profile.model,
            weights_read_s(shape, 1, H200),
            functools.partial(compute_s, shape, 1, H200),
            keys_rate=E_KEYS_BOXES if boxes else E_KEYS,
        )
        decode_only, with_chunk = beside_steps(log)
        data[name] = (
            model,
            [(s["steps_sms"], s["measured_s"], seqs_composition(s["seqs"])) for s in decode_only],
        )
        chunk_data[name] = [
            (s["steps_sms"], s["measured_s"], seqs_composition(s["seqs"])) for s in with_chunk
        ]

    def table(name: str) -> dict:
        model, rows = data[name]
        new = [(m, model.confined_s(c, sms / num_sms)) for sms, m, c in rows]
        old = [(m, model.base.step_time_s(c) * max(1.0, num_sms / (sms * ONE_RATE))) for sms, m, c in rows]
        by_sms: dict[int, list[int]] = defaultdict(list)
        for i, row in enumerate(rows):
            by_sms[row[0]].append(i)
        return {
            "steps": len(rows),
            "model_median_p90": errors(new),
            "one_rate_median_p90": errors(old),
            "by_steps_sms": {
                sms: {
                    "steps": len(ix),
                    "measured_p50_ms": 1e3 * statistics.median(new[i][0] for i in ix),
                    "model_p50_ms": 1e3 * statistics.median(new[i][1] for i in ix),
                    "one_rate_p50_ms": 1e3 * statistics.median(old[i][1] for i in ix),
                }
                for sms, ix in sorted(by_sms.items())
            },
        }

    result: dict = {
        "constants": {"E_WEIGHTS": E_WEIGHTS, "E_KEYS": E_KEYS, "E_KEYS_BOXES": E_KEYS_BOXES, "E_CHUNKS": E_CHUNKS},
        "runs": {},
    }
    for name in runs:
        result["runs"][name] = table(name)
        r = result["runs"][name]
        print(
            f"{name}: {r['steps']} steps, median / p90 error {r['model_median_p90']} (one rate: {r['one_rate_median_p90']})"
        )

    def score(names: list[str], ew: float, ek: float) -> float:
        total = 0.0
        for name in names:
            model, rows = data[name]
            fitted = BesideLaneLatencyModel(model.inner, model.base, model.weights_s, model.compute_s, ew, ek)
            med, p90 = errors([(m, fitted.confined_s(c, sms / num_sms)) for sms, m, c in rows])
            total += med + p90 / 2
        return total

    pointers = [n for n in runs if n not in boxes_runs]
    keys_grid = [x / 100 for x in range(70, 301, 5)]
    result["best_fit"] = {}
    if pointers:
        best = min((score(pointers, ew, ek), ew, ek) for ew in [x / 10 for x in range(15, 41)] for ek in keys_grid)
        result["best_fit"] = {"score": best[0], "E_WEIGHTS": best[1], "E_KEYS": best[2]}
        print(f"best fit (pointer gathers): E_WEIGHTS {best[1]}, E_KEYS {best[2]} (score {best[0]:.3f})")
    if boxes_runs:
        ew = result["best_fit"].get("E_WEIGHTS", E_WEIGHTS)
        best_boxes = min((score(sorted(boxes_runs), ew, ek), ek) for ek in keys_grid)
        result["best_fit"] |= {"E_KEYS_BOXES": best_boxes[1], "boxes_score": best_boxes[0]}
        print(f"best fit (TMA boxes, E_WEIGHTS {ew}): E_KEYS_BOXES {best_boxes[1]} (score {best_boxes[0]:.3f})")
    # the chunks' rate, on the steps with a chunk (the two rates above as the model has them)
    chunk_grid = []
    for ec in [x / 100 for x in range(50, 401, 5)]:
        score, per_run = 0.0, {}
        for name, rows in chunk_data.items():
            if not rows:
                continue
            model = data[name][0]
            fitted = BesideLaneLatencyModel(
                model.inner, model.base, model.weights_s, model.compute_s, keys_rate=model.keys_rate, chunks_rate=ec
            )
            per_run[name] = errors([(m, fitted.confined_s(c, sms / num_sms)) for sms, m, c in rows])
            score += per_run[name][0] + per_run[name][1] / 2
        chunk_grid.append((score, ec, per_run))
    for name, rows in chunk_data.items():
        if rows:
            model = data[name][0]
            now = errors([(m, model.confined_s(c, sms / num_sms)) for sms, m, c in rows])
            result["runs"][name]["chunk_steps"] = {"steps": len(rows), "model_median_p90": now}
            print(f"{name}: {len(rows)} steps with a chunk, median / p90 error {now}")
    score, ec, per_run = min(chunk_grid, key=lambda g: g[0])
    result["best_fit"]["E_CHUNKS"] = ec
    result["best_fit"]["chunk_steps_median_p90"] = per_run
    print(f"best fit: E_CHUNKS {ec} (score {score:.3f}): {per_run}")
    ns.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
