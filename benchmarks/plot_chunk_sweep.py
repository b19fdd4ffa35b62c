"""Plot benchmarks/results/chunk_sweep/chunk_sweep_h200_*.json (benchmarks/chunk_sweep.py):
whole-model chunk-step time over its floor against the chunk length, per prefix, for both
shapes; each path measured (thin) and the one the committed cost model picks (thick).

    python -m benchmarks.plot_chunk_sweep benchmarks/results/chunk_sweep/chunk_sweep_h200_2026-11-29.json

Also writes `<json stem>.summary.json`: per (shape, prefix, chunk) the picked path, its time,
the floor and the ratio, and the per-token cost of each chunk relative to the longest one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mnemosyne.latency.kernel_cost import H200_COST, ChunkPath

SHAPES = {"8b": ("Llama-3-8B shape", 32, 128), "1b": ("Llama-3.2-1B shape", 32, 64)}


def summarize(res: dict) -> list[dict]:
    rows = []
    for key, (_, heads, head_dim) in SHAPES.items():
        for e in res.get(key, {}).get("steps", []):
            path = H200_COST.cheaper(e["chunk"], e["prefix"] + e["chunk"], heads, head_dim)
            t = e.get(path.value + "_s")
            rows.append({
                "shape": key, "prefix": e["prefix"], "chunk": e["chunk"], "path": path.value, "s": t,
                "floor_s": e["floor_s"], "ratio_to_floor": t / e["floor_s"] if t else None,
                "triton_splitkv_s": e.get("triton_splitkv_s"), "cudnn_s": e.get("cudnn_s"),
            })  # fmt: skip
    for r in rows:  # per-token cost against the longest chunk measured at the same prefix
        same = [x for x in rows if x["shape"] == r["shape"] and x["prefix"] == r["prefix"] and x["s"]]
        ref = max(same, key=lambda x: x["chunk"])
        if r["s"]:
            r["per_token_vs_longest"] = (r["s"] / r["chunk"]) / (ref["s"] / ref["chunk"])
            r["longest_chunk"] = ref["chunk"]
    return rows


def main(path: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = json.loads(Path(path).read_text())
    rows = summarize(res)
    Path(path).with_suffix(".summary.json").write_text(json.dumps({"mixed": res["8b"].get("mixed"), "steps": rows},
                                                                  indent=1))  # fmt: skip
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, (key, (title, _, _)) in zip(axes, SHAPES.items(), strict=True):
        prefixes = sorted({r["prefix"] for r in rows if r["shape"] == key})
        for i, p in enumerate(prefixes):
            color = f"C{i}"
            pts = [r for r in rows if r["shape"] == key and r["prefix"] == p]
            cs = [r["chunk"] for r in pts]
            ax.plot(cs, [r["ratio_to_floor"] for r in pts], "o-", color=color, lw=2.5,
                    label=f"P = {p:,} keys: cost-model pick")  # fmt: skip
            for name, style in ((ChunkPath.TRITON_SPLITKV, ":"), (ChunkPath.CUDNN, "--")):
                ys = [(r[name.value + "_s"] / r["floor_s"]) if r[name.value + "_s"] else None for r in pts]
                ax.plot(cs, ys, style, color=color, lw=1, alpha=0.7)
        ax.axhline(1.3, color="k", lw=0.8, ls="-.", label="target 1.3x")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("chunk (query tokens)")
        ax.set_ylabel("step time / max(FLOP floor, bytes floor)")
        ax.set_title(f"{title}, 1x H200, bf16 (dotted: Triton split-KV, dashed: cuDNN)", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    out = Path(path).with_suffix(".png")
    fig.savefig(out, dpi=120)
    return out


if __name__ == "__main__":
    print(main(sys.argv[1]))
