"""Plot benchmarks/results/serve_h200_*.json (from benchmarks/serve_gpu.py): throughput and
latency per scenario, before and after the cuDNN ragged-path change, with the floors.

    python -m benchmarks.plot_serve benchmarks/results/serve_h200_2026-11-21.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(path: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = json.loads(Path(path).read_text())
    names = list(res["after"]["scenarios"])
    runs = [
        ("before (cuDNN graph per shape)", res["before_cudnn_fix"]),
        ("after (ragged cuDNN, min keys)", res["after"]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    x = range(len(names))
    w = 0.38
    for i, (label, run) in enumerate(runs):
        s = run["scenarios"]
        xs = [j + (i - 0.5) * w for j in x]
        axes[0].bar(xs, [s[n]["total_token_throughput"] / 1e3 for n in names], w, label=label)
        axes[1].bar(xs, [s[n]["p99_tbt_ms"] for n in names], w, label=f"{label} p99")
        axes[1].scatter(xs, [s[n]["median_tbt_ms"] for n in names], color="k", s=12, zorder=3)
        axes[2].bar(xs, [s[n]["median_ttft_ms"] for n in names], w, label=label)
    off = res["after_offline_all256"]["total_token_throughput"] / 1e3
    axes[0].axhline(off, color="g", ls="--", lw=1, label=f"offline LLM.generate, all256: {off:.1f}K")
    axes[1].axhline(res["floors"]["c1_tbt_ms"], color="r", ls=":", lw=1, label="decode floor, batch 1")
    axes[1].axhline(50, color="gray", ls="--", lw=1, label="TBT SLO 50 ms")
    axes[2].set_yscale("log")
    for ax, title in zip(
        axes,
        ("total tokens/s (K)", "time between tokens, ms (dots: p50)", "median TTFT, ms (log)"),
        strict=True,
    ):
        ax.set_xticks(list(x), names)
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"mnemosyne serve + bench serve, {res['model']}, {res['device']}, {res['date']} "
        f"(input {res['input_len']}, output {res['output_len']})",
        fontsize=9,
    )
    fig.tight_layout()
    out = Path(path).with_suffix(".png")
    fig.savefig(out, dpi=110)
    return out


if __name__ == "__main__":
    print(main(sys.argv[1]))
