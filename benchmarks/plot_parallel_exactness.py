"""Plot `parallel_exactness` JSON files: per layout, the prompt-logprob difference vs one device.

    python -m benchmarks.plot_parallel_exactness OUT.png RESULT.json [RESULT.json ...]

One group of bars per layout, one bar per JSON file (e.g. float32 and bfloat16 runs),
log scale; the height is the mean |diff| and the whisker reaches the max. A marker
above a bar says the greedy tokens were not identical. Needs matplotlib.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2:
        print(__doc__)
        return 2
    out, files = Path(args[0]), [Path(a) for a in args[1:]]
    runs = [json.loads(f.read_text()) for f in files]
    layouts = [r["layout"] for r in runs[0]["results"] if r["layout"] != "reference tp1"]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        by_layout = {r["layout"]: r for r in run["results"]}
        xs, means, errs, flips = [], [], [], []
        for j, name in enumerate(layouts):
            r = by_layout.get(name)
            if r is None or "prompt_lp_mean" not in r:
                continue
            mean = max(r["prompt_lp_mean"], 1e-9)
            xs.append(j + (i - (len(runs) - 1) / 2) * width)
            means.append(mean)
            errs.append(max(r["prompt_lp_max"], mean) - mean)
            flips.append(not r["tokens_identical"])
        label = f"{run['dtype']}" + (f" ({files[i].stem})" if len(runs) > 2 else "")
        bars = ax.bar(xs, means, width, yerr=[[0] * len(errs), errs], capsize=3, label=label)
        for x, m, e, f in zip(xs, means, errs, flips, strict=True):
            if f:
                ax.text(
                    x, (m + e) * 1.3, "tokens\ndiffer", ha="center", fontsize=7, color=bars[0].get_facecolor()
                )
    ax.set_yscale("log")
    ax.set_ylim(top=1.0)
    ax.set_xticks(range(len(layouts)), layouts, rotation=20)
    ax.set_ylabel("|prompt logprob - 1-GPU| (nats): mean, whisker = max")
    first = runs[0]
    ax.set_title(
        f"Parallel layouts vs one GPU, random Llama-3.2-1B shape, {first['device_count']}x {first['device_name']}, "
        f"{first['date']}",
        fontsize=10,
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
