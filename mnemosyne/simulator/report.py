"""Per-request metrics and the summary of a simulation (all times in seconds of virtual time).

ttft_s   first token time - arrival          tbt gaps  between consecutive tokens
e2e_s    last token time - arrival           SLO met   max gap <= tbt_slo (and ttft <= ttft_slo)
"""

from __future__ import annotations

from collections.abc import Sequence

from mnemosyne.simulator.engine import SimulatedEngine, SimulatedRequest

PERCENTILES = (50, 90, 99)


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    v = sorted(values)
    pos = (len(v) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def _gaps(r: SimulatedRequest) -> list[float]:
    t = r.token_times_s
    return [b - a for a, b in zip(t, t[1:], strict=False)]


def request_metrics(r: SimulatedRequest) -> dict:
    gaps = _gaps(r)
    return {
        "id": r.request_id,
        "arrival_s": r.arrival_s,
        "prompt_len": r.prompt_len,
        "output_len": r.output_len,
        "ttft_s": r.token_times_s[0] - r.arrival_s if r.token_times_s else None,
        "tbt_p50_s": percentile(gaps, 50),
        "tbt_max_s": max(gaps) if gaps else None,
        "e2e_s": r.finish_s - r.arrival_s if r.finish_s is not None else None,
        "num_preemptions": r.num_preemptions,
    }


def _pcts(values: list[float]) -> dict:
    return {f"p{q}": percentile(values, q) for q in PERCENTILES} | {"max": max(values) if values else None}


def summarize(engine: SimulatedEngine, tbt_slo_s: float, ttft_slo_s: float | None) -> dict:
    reqs = list(engine.requests.values())
    rows = [request_metrics(r) for r in reqs]
    all_gaps = [g for r in reqs for g in _gaps(r)]
    first = min((r.arrival_s for r in reqs), default=0.0)
    makespan = max(engine.now_s - first, 1e-12)
    met = [
        (row["tbt_max_s"] is None or row["tbt_max_s"] <= tbt_slo_s)
        and (ttft_slo_s is None or (row["ttft_s"] is not None and row["ttft_s"] <= ttft_slo_s))
        for row in rows
    ]
    summary = {
        "num_requests": len(rows),
        "num_steps": engine.num_steps,
        "num_preemptions": engine.scheduler.num_preemptions,
        "makespan_s": makespan,
        "ttft_s": _pcts([row["ttft_s"] for row in rows if row["ttft_s"] is not None]),
        "tbt_s": _pcts(all_gaps),
        "e2e_s": _pcts([row["e2e_s"] for row in rows if row["e2e_s"] is not None]),
        "throughput": {
            "requests_per_s": len(rows) / makespan,
            "output_tokens_per_s": sum(len(r.token_times_s) for r in reqs) / makespan,
            "prompt_tokens_per_s": sum(r.prompt_len for r in reqs) / makespan,
        },
        "slo": {
            "tbt_slo_s": tbt_slo_s,
            "ttft_slo_s": ttft_slo_s,
            "attainment": sum(met) / len(met) if met else None,
        },
    }
    return {"requests": rows, "summary": summary}


def plot(result: dict, path: str) -> None:
    """TTFT and max TBT per request against arrival time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["requests"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    x = [r["arrival_s"] for r in rows]
    a.scatter(x, [r["ttft_s"] for r in rows], s=8)
    a.set(xlabel="arrival (s)", ylabel="TTFT (s)", title="TTFT per request (simulated)")
    b.scatter(x, [(r["tbt_max_s"] or 0) * 1e3 for r in rows], s=8, color="C1")
    slo = result["summary"]["slo"]["tbt_slo_s"]
    b.axhline(slo * 1e3, color="k", ls="--", lw=1, label="TBT SLO")
    b.set(xlabel="arrival (s)", ylabel="max TBT (ms)", title="worst gap per request (simulated)")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
