"""The paper's scaling figures, SIMULATED: `mnemosyne simulate`'s engine (the real scheduler in
virtual time) with the roofline latency model of H100 / H200 (`latency/roofline.py`).

    python -m benchmarks.simulated_paper_figures --out benchmarks/results/simulated_paper_figures.json

  (a) TTFT of one 1M-token prompt against the SPP degree (1..16), tp=8 per stage, fixed 4096-token
      chunks, spp micro-batches in flight; scaling efficiency = TTFT(1) / (spp * TTFT(spp));
      also the TBT of its decode (a token crosses every stage).
  (b) TBT (p50 of the decode gaps) of one request at 1M..10M context against the KVP degree
      (1..16), tp=8, spp=1, max_tokens_per_kvp_group = ceil(L / kvp); a layout whose KV
      does not fit (weights + KV within 90% of the GPU) is reported as such.
Shapes: Llama-3-8B and Llama-3-70B (bf16), from their config.json values; no weights.
Nothing here is measured: the numbers are the latency model's, and the paper's reported
figures sit beside them (`PAPER`).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from mnemosyne.engine.args import EngineArgs
from mnemosyne.errors import MnemosyneError
from mnemosyne.simulator.engine import SimulatedEngine, run_trace
from mnemosyne.simulator.report import summarize
from mnemosyne.simulator.setup import device_spec, latency_model_for, simulated_engine_config
from mnemosyne.simulator.trace import TraceRequest

_LLAMA3 = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192,
    "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128009, "torch_dtype": "bfloat16",
}  # fmt: skip
SHAPES = {
    "llama3-8b": _LLAMA3 | {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                            "num_attention_heads": 32},
    "llama3-70b": _LLAMA3 | {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                             "num_attention_heads": 64},
}  # fmt: skip
PAPER = {
    "source": "arXiv 2409.17264 (Mnemosyne / Medha), as summarised in docs: shared/design/paper-notes.md",
    "spp": [
        "80%+ scaling efficiency to 128 H100s for Llama-3-8B (tp8 x spp16)",
        "85% scaling efficiency at 8 stages for Llama-3-70B",
        "up to 1.64x lower 1M-token prefill latency than context (ring) parallelism",
        "deep pipelines add decode latency: +16% at 8 stages",
        "1M tokens of prefill on Llama-3-70B is about 2.8 EFLOP: at least 48 minutes on one H100",
    ],
    "kvp": [
        "about 40% lower decode latency at 10M tokens",
        "up to 92% memory-bandwidth utilisation; sub-linear scaling because of communication",
        "v1: 10M-token contexts within a 30 ms TBT SLO",
    ],
}
GPUS = ("h100", "h200")
SPP_DEGREES = (1, 2, 4, 8, 16)
KVP_DEGREES = (1, 2, 4, 8, 16)
CONTEXTS = (1_000_000, 2_000_000, 4_000_000, 10_000_000)
CHUNK = 4096
BLOCK = 16


def simulate_one(model_dir: Path, gpu: str, prompt_len: int, output_len: int, **layout: int) -> dict:
    """One request alone; its TTFT and decode TBT, or why it does not fit."""
    args = EngineArgs(
        model=str(model_dir),
        max_model_len=prompt_len + output_len + BLOCK,
        block_size=BLOCK,
        chunk_size=CHUNK,
        max_num_batched_tokens=CHUNK,
        enable_prefix_caching=False,
        **layout,
    )
    spec = device_spec(gpu)
    try:
        config = simulated_engine_config(model_dir, args, spec)
        model, source = latency_model_for(config, spec)
        engine = SimulatedEngine(config, model, source)
        run_trace(engine, [TraceRequest(0.0, prompt_len, output_len)])
    except (MnemosyneError, ValueError) as e:
        return {"fits": False, "why": str(e)}
    row = summarize(engine, config.policy.tbt_slo_s, None)["requests"][0]
    return {"fits": True, "ttft_s": row["ttft_s"], "tbt_s": row["tbt_p50_s"], "num_steps": engine.num_steps}


def spp_figure(dirs: dict[str, Path]) -> list[dict]:
    rows = []
    for shape, d in dirs.items():
        for gpu in GPUS:
            base = None
            for spp in SPP_DEGREES:
                r = simulate_one(d, gpu, 1_000_000, 8, tp=8, spp=spp)
                if r["fits"]:
                    base = r["ttft_s"] if spp == 1 else base
                    r["scaling_efficiency"] = base / (spp * r["ttft_s"]) if base else None
                rows.append({"shape": shape, "gpu": gpu, "tp": 8, "spp": spp, "num_gpus": 8 * spp, **r})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def kvp_figure(dirs: dict[str, Path]) -> list[dict]:
    rows = []
    for shape, d in dirs.items():
        for gpu in GPUS:
            for ctx in CONTEXTS:
                for kvp in KVP_DEGREES:
                    per_group = -(-(ctx + 16) // kvp)
                    t = -(-per_group // BLOCK) * BLOCK
                    layout = {"tp": 8, "kvp": kvp} | ({"max_tokens_per_kvp_group": t} if kvp > 1 else {})
                    r = simulate_one(d, gpu, ctx, 16, **layout)
                    rows.append({"shape": shape, "gpu": gpu, "context_len": ctx, "tp": 8, "kvp": kvp, **r})
                    print(json.dumps({k: v for k, v in rows[-1].items() if k != "why"}), flush=True)
    return rows


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(17, 4.8))
    for shape in SHAPES:
        for gpu, ls in zip(GPUS, ("--", "-"), strict=True):
            pts = [r for r in result["spp"] if r["shape"] == shape and r["gpu"] == gpu and r["fits"]]
            a.plot(
                [r["spp"] for r in pts], [r["ttft_s"] for r in pts], ls, marker="o", label=f"{shape} {gpu}"
            )
            b.plot([r["spp"] for r in pts], [100 * r["scaling_efficiency"] for r in pts], ls, marker="o",
                   label=f"{shape} {gpu}")  # fmt: skip
    a.set(xscale="log", yscale="log", xlabel="SPP degree (tp=8 per stage)", ylabel="TTFT of 1M tokens (s)",
          title="(a) 1M prefill vs SPP  [SIMULATED]")  # fmt: skip
    b.axhline(80, color="k", lw=0.8, ls=":", label="paper: 8B 80%+ at 16 stages")
    b.axhline(85, color="gray", lw=0.8, ls=":", label="paper: 70B 85% at 8 stages")
    b.set(xscale="log", xlabel="SPP degree", ylabel="scaling efficiency (%)", ylim=(0, 105),
          title="(a') SPP scaling efficiency  [SIMULATED]")  # fmt: skip
    for ctx, color in zip(CONTEXTS, ("C0", "C1", "C2", "C3"), strict=True):
        for shape, ls in zip(SHAPES, ("-", "--"), strict=True):
            pts = [r for r in result["kvp"] if r["shape"] == shape and r["gpu"] == "h200"
                   and r["context_len"] == ctx and r["fits"]]  # fmt: skip
            c.plot([r["kvp"] for r in pts], [1e3 * r["tbt_s"] for r in pts], ls, color=color, marker="o",
                   label=f"{shape} {ctx // 1_000_000}M")  # fmt: skip
    c.axhline(30, color="k", lw=0.8, ls=":", label="30 ms TBT SLO")
    c.set(xscale="log", yscale="log", xlabel="KVP degree (tp=8, H200)", ylabel="TBT p50 (ms)",
          title="(b) decode TBT vs KVP  [SIMULATED]")  # fmt: skip
    for ax in (a, b, c):
        ax.legend(fontsize=7)
    fig.suptitle("Simulated with the roofline latency model (no GPU measured); missing points do not fit")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ns = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {}
        for name, cfg in SHAPES.items():
            dirs[name] = Path(tmp) / name
            dirs[name].mkdir()
            (dirs[name] / "config.json").write_text(json.dumps(cfg))
        result = {
            "simulated": True,
            "latency_model": "roofline (mnemosyne/latency/roofline.py: H100 and H200 DeviceSpecs)",
            "date": datetime.now(UTC).strftime("%Y-%m-%d"),
            "command": f"python -m benchmarks.simulated_paper_figures --out {ns.out}",
            "spp": spp_figure(dirs),
            "kvp": kvp_figure(dirs),
            "paper": PAPER,
        }
    ns.out.write_text(json.dumps(result, indent=1))
    plot(result, ns.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
