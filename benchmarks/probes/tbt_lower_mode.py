"""Short requests' token gaps as the client saw them against the engine's steps, from a served
run's records (CPU only).

    python -m benchmarks.probes.tbt_lower_mode RUN_DIR [RUN_DIR ...] --out OUT.json

RUN_DIR is a `benchmarks.serving_trace --step-logs` output (serving_trace.json,
runs/CONFIG.bench.json[.gz], runs/CONFIG.steps.jsonl.gz). Per run:

    client          the short requests' gaps (bench records): p10 / p50 / p90, the share under
                    LOWER_MODE_MS (decode-only steps; the rest are steps beside a long prompt's
                    chunk), and that lower mode's p10 / p50 / p90
    engine          each step's period weighted by the decodes it returns (one gap each), steps
                    submitted with nothing in flight left out: the same figures
    delivery sigma  sqrt((var client - var engine) / 2) over gaps and decode-only step periods
                    under JITTER_MS: two consecutive tokens' delivery delays differ by a
                    variable of twice the delay's variance, if the delay is independent per token
    by decodes      decode-only steps by their number of decodes: count, p50, p90 (ms)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from benchmarks.serving_trace_data import read_bench
from mnemosyne.engine.step_log import read_step_log

LOWER_MODE_MS = 8.0
JITTER_MS = 4.0


def weighted_quantiles(values: np.ndarray, weights: np.ndarray, qs: tuple[float, ...]) -> list[float]:
    order = np.argsort(values)
    cum = np.cumsum(weights[order]) / weights.sum()
    return [float(values[order][np.searchsorted(cum, q)]) for q in qs]


def run_figures(run_dir: Path, config: str) -> dict:
    kinds = [r["kind"] for r in json.loads((run_dir / "serving_trace.json").read_text())["results"][config]["requests"]]
    records = read_bench(run_dir / "runs" / f"{config}.bench.json")["requests"]
    gaps = 1e3 * np.array([g for r, k in zip(records, kinds, strict=True) if k == "short" for g in r["itl_s"]])
    _, steps = read_step_log(run_dir / "runs" / f"{config}.steps.jsonl.gz")
    period, weight, decode_only = [], [], []
    for s in steps:
        num_decodes = sum(1 for n, _ in s["seqs"] if n == 1)
        if num_decodes and not s.get("idle_start"):
            period.append(1e3 * s["measured_s"])
            weight.append(num_decodes)
            decode_only.append(all(n == 1 for n, _ in s["seqs"]))
    p, w, only = np.array(period), np.array(weight), np.array(decode_only)
    lower, p_lower = gaps < LOWER_MODE_MS, p < LOWER_MODE_MS
    qs = (0.1, 0.5, 0.9)
    jitter_client = gaps[gaps < JITTER_MS]
    sel = only & (p < JITTER_MS)
    mean = np.average(p[sel], weights=w[sel])
    var_engine = float(np.average((p[sel] - mean) ** 2, weights=w[sel]))
    by_decodes = {}
    for n in sorted(set(w[only].tolist())):
        x = p[only & (w == n)]
        if len(x) >= 20:
            by_decodes[int(n)] = {"steps": len(x), "p50_ms": float(np.percentile(x, 50)), "p90_ms": float(np.percentile(x, 90))}
    return {
        "client_p10_p50_p90_ms": [float(x) for x in np.percentile(gaps, [10, 50, 90])],
        "client_lower_mode_share": float(lower.mean()),
        "client_lower_mode_p10_p50_p90_ms": [float(x) for x in np.percentile(gaps[lower], [10, 50, 90])],
        "engine_p10_p50_p90_ms": weighted_quantiles(p, w, qs),
        "engine_lower_mode_share": float(w[p_lower].sum() / w.sum()),
        "engine_lower_mode_p10_p50_p90_ms": weighted_quantiles(p[p_lower], w[p_lower], qs),
        "delivery_sigma_ms": float(np.sqrt(max(jitter_client.var() - var_engine, 0.0) / 2)),
        "decode_only_steps_by_decodes": by_decodes,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dirs", type=Path, nargs="+")
    ap.add_argument("--config", default="lars_adaptive")
    ap.add_argument("--out", type=Path, required=True)
    ns = ap.parse_args(argv)
    res = {"benchmark": "tbt_lower_mode", "config": ns.config,
           "runs": {str(d): run_figures(d, ns.config) for d in ns.run_dirs}}  # fmt: skip
    print(json.dumps(res, indent=1))
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
