"""Plot OUT/serving_trace.json (from benchmarks/serving_trace.py): CDFs of the short and the long
requests' TTFT and of every gap between tokens (TBT), one line per configuration, with the
TBT SLO, and the SLO attainment of each configuration.

    python -m benchmarks.plot_serving_trace benchmarks/results/serving_trace_8b/serving_trace.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from benchmarks.serving_trace_data import TBT_LEVELS


def _cdf(ax, values: list[float], label: str) -> None:
    if not values:
        return
    xs = np.sort(np.asarray(values))
    ax.step(xs, np.arange(1, xs.size + 1) / xs.size, where="post", label=label)


def plot(combined: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.6))
    slo_ms = combined["server_flags"]["tbt_slo_ms"]
    for name, res in combined["results"].items():
        first = [r for r in res["requests"] if r["ttft_s"] is not None]
        _cdf(axes[0], [1e3 * r["ttft_s"] for r in first if r["kind"] == "short"], name)
        _cdf(axes[1], [r["ttft_s"] for r in first if r["kind"] == "long"], name)
        if res["tbt_all_ms_percentiles"]:
            axes[2].plot(res["tbt_all_ms_percentiles"], np.asarray(TBT_LEVELS) / 100.0, label=name)
    axes[2].axvline(slo_ms, color="k", ls="--", lw=0.8, label=f"TBT SLO {slo_ms:g} ms")
    floors = combined["floors"]["long_prefill_s"]
    if floors:
        _cdf(axes[1], floors, "prefill floor")
    for ax, title, xlabel in zip(
        axes[:3],
        ("TTFT, short requests", "TTFT, long requests", "TBT, every gap (all requests)"),
        ("ms (log)", "s", "ms (log)"),
        strict=True,
    ):
        ax.set(title=title, xlabel=xlabel, ylabel="fraction")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_xscale("log")
    axes[2].set_xscale("log")
    names = list(combined["results"])
    keys = [
        ("tbt_within_slo_all", f"TBT <= {slo_ms:g} ms"),
        ("ttft_within_deadline_short", "TTFT in deadline, short"),
        ("ttft_within_deadline_long", "TTFT in deadline, long"),
    ]
    width = 0.8 / len(keys)
    for k, (key, label) in enumerate(keys):
        vals = [combined["results"][n]["slo"][key] or 0.0 for n in names]
        axes[3].bar([i + (k - 1) * width for i in range(len(names))], vals, width, label=label)
    axes[3].set_xticks(range(len(names)), names, fontsize=8)
    axes[3].set(title="SLO attainment", ylim=(0, 1.05))
    axes[3].legend(fontsize=7)
    trace = combined["trace"]
    fig.suptitle(
        f"{'SIMULATED (a prediction, not a measurement)' if combined.get('SIMULATED') else 'mnemosyne serve'}, "
        f"{combined['shape'] or 'custom model'}, {combined['device']}, {combined['date'][:10]}: "
        f"{trace['num_short']} short + {trace['num_long']} long requests over "
        f"{combined['trace_spec']['duration_s']:g} s (Poisson {combined['trace_spec']['rate_per_s']:g}/s)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    src = Path(sys.argv[1])
    plot(json.loads(src.read_text()), src.with_suffix(".png"))
    print(src.with_suffix(".png"))
