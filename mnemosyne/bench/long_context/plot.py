"""Plot a long_context JSON: TBT and TTFT vs context (Mnemosyne, HF, floors), kernel throughput.

    python -m mnemosyne.bench.long_context.plot RESULT.json [--out OUT.png] [--decode-kernels LOG]

`--decode-kernels LOG` replaces the JSON's decode-kernel rows by those of a later
`python -m mnemosyne.bench.long_context.kernels` run (one dict per line), so the plot
shows the figures a results table cites. Each bar is labelled with the figure it draws.
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path


def read_kernel_log(path: Path) -> list[dict]:
    """The result dicts printed one per line by kernels.run_all()."""
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("{"):
            rows.append(ast.literal_eval(line))
    return rows


def with_decode_kernels(res: dict, rows: list[dict]) -> dict:
    """`res` with its decode-kernel results replaced by the decode rows of `rows`."""
    kept = [r for r in res.get("kernels", {}).get("results", []) if r.get("kind") != "decode"]
    decode = [r for r in rows if r.get("kind") == "decode"]
    return {**res, "kernels": {**res.get("kernels", {}), "results": decode + kept}}


def plot(res: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eng, hf = res.get("engine", {}), res.get("hf", {})
    fig, ax = plt.subplots(1, 3, figsize=(17, 4.8))
    k = 1024
    # TBT
    a = ax[0]
    dec = eng.get("decode", [])
    if dec:
        xs = [d["ctx"] / k for d in dec]
        a.plot(xs, [d["graph_s"] * 1e3 for d in dec], "o-", label="Mnemosyne decode step (CUDA graph)")
        a.plot(xs, [d["floor_s"] * 1e3 for d in dec], "k--", label="floor: (weights + KV) / 4.2 TB/s")
    e2e = eng.get("e2e", [])
    if e2e:
        a.plot(
            [e["ctx"] / k for e in e2e],
            [e["tbt_median_s"] * 1e3 for e in e2e],
            "s",
            label="Mnemosyne end to end",
        )
    runs = [r for r in hf.get("runs", []) if "tbt_median_s" in r]
    if runs:
        a.plot(
            [r["ctx"] / k for r in runs],
            [r["tbt_median_s"] * 1e3 for r in runs],
            "^",
            label="HF transformers",
        )
    for r in hf.get("runs", []):
        if r.get("oom"):
            a.axvline(r["ctx"] / k, color="r", ls=":", label=f"HF out of memory at {r['ctx'] // k}K")
    a.set(xlabel="context (K tokens)", ylabel="TBT (ms)", title="time between tokens, batch 1")
    a.legend(fontsize=7)
    # TTFT
    a = ax[1]
    est = eng.get("ttft_estimate", [])
    if est:
        xs = [e["ctx"] / k for e in est]
        a.plot(xs, [e["ttft_s"] for e in est], "o-", label="Mnemosyne (sum of measured chunk steps)")
        a.plot(xs, [e["floor_s"] for e in est], "k--", label="floor: FLOPs / (800 | 590 TFLOP/s)")
    if e2e:
        a.plot([e["ctx"] / k for e in e2e], [e["ttft_s"] for e in e2e], "s", label="Mnemosyne end to end")
    runs = [r for r in hf.get("runs", []) if "ttft_s" in r]
    if runs:
        a.plot([r["ctx"] / k for r in runs], [r["ttft_s"] for r in runs], "^", label="HF transformers")
    a.set(xlabel="context (K tokens)", ylabel="TTFT (s)", title="time to first token, 1 GPU", yscale="log")
    a.legend(fontsize=7)
    # kernels
    a = ax[2]
    kr = [r for r in res.get("kernels", {}).get("results", []) if "ratio_to_floor" in r]
    labels, ratios = [], []
    for r in kr:
        if r["kind"] == "decode":
            labels.append(
                f"decode {r['num_seqs']}x{r['ctx'] // k}K d{r['head_dim']}{' shuf' if r['shuffled_blocks'] else ''}\n{r['tbps']:.2f} TB/s"
            )
        else:
            labels.append(
                f"{r['path']} c{r['chunk']}@{r['prefix'] // k}K d{r['head_dim']}{' shuf' if r['shuffled_blocks'] else ''}\n{r['tflops']:.0f} TFLOP/s"
            )
        ratios.append(1 / r["ratio_to_floor"])
    a.barh(range(len(ratios)), ratios)
    a.set_yticks(range(len(ratios)), labels, fontsize=6)
    a.axvline(1.0, color="k", ls="--")
    a.set(xlabel="fraction of the floor's speed (1 = floor)", title="attention kernels")
    dev = res.get("device", {})
    fig.suptitle(
        f"{res.get('shape')} random weights, bf16 — {dev.get('gpu')} — {res.get('date')}", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("result", type=Path, help="long_context JSON")
    ap.add_argument("--out", type=Path, default=None, help="PNG (default: beside the JSON)")
    ap.add_argument("--decode-kernels", type=Path, default=None, help="kernel log whose decode rows to plot")
    ns = ap.parse_args(argv)
    res = json.loads(ns.result.read_text())
    if ns.decode_kernels is not None:
        res = with_decode_kernels(res, read_kernel_log(ns.decode_kernels))
    plot(res, ns.out or ns.result.with_suffix(".png"))


if __name__ == "__main__":
    main()
