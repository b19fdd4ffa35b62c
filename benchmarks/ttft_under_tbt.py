"""The best long-prompt TTFT under a TBT target, SIMULATED (latency models, no GPU runs this).

    python -m benchmarks.ttft_under_tbt \
        --profile benchmarks/results/latency_profile_quick_h200_2026-11-29_piecewise.json \
        --out benchmarks/results/simulated/ttft_under_tbt_8b_h200_2026-11-29.json

The mixed scenario of `benchmarks/mixed_long_short.py` (8B shape, one H200): a 256K-token
prompt prefills while 32 requests decode (1K-token context, one more token each step). Every
step carries their tokens, so every step must stay within the TBT target; the bound takes the
largest chunk that fits at each step (`mnemosyne/simulator/ttft_bound.py`). For the roofline
model of the H200 and for the measured quick profile:

    scenario   the bound at 30 ms, against the prompt's FLOPs floor (800 / 590 TFLOP/s) and the
               issue's bar (1.3 x floor), the prefix from which not even one token fits
    needed     the smallest TBT target whose bound is within 1.3 x the floor
    sweep      the bound for 0 / 8 / 32 / 64 decodes and 30 / 45 / 60 / 100 ms targets
    what_if    the profile with its per-step constants cut (per chunk, per step, per sampled row):
               what the kernels must shed for the bar to hold at 30 ms
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from mnemosyne.latency.fitted import GROUP_FEATURES, FittedLatencyModel
from mnemosyne.latency.profile_store import load_profile
from mnemosyne.latency.roofline import H200, RooflineLatencyModel
from mnemosyne.latency.shape import Layout
from mnemosyne.simulator.ttft_bound import best_ttft_under_tbt, prompt_flops_floor_s, slo_for_ttft_s

FLOOR_FACTOR = 1.3  # the bar: long TTFT within 1.3 x its floor
SWEEP_DECODES = (0, 8, 32, 64)
SWEEP_TBT_S = (0.030, 0.045, 0.060, 0.100)
WHAT_IF = {  # profile coefficients replaced (seconds per unit of the feature)
    "no per-chunk constant": {"chunks": 0.0},
    "no per-chunk constant, 0.8 ms per step (the roofline's host time)": {"chunks": 0.0, "one": 0.8e-3},
    "... and no per-sampled-row constant": {"chunks": 0.0, "one": 0.8e-3, "sampled": 0.0},
}


def with_coefficients(model: FittedLatencyModel, replaced: dict[str, float]) -> FittedLatencyModel:
    coefficients = dict(zip(GROUP_FEATURES, model.group_coefficients_s, strict=True)) | replaced
    return dataclasses.replace(model, group_coefficients_s=tuple(coefficients[f] for f in GROUP_FEATURES))


def summary(bound, floor_s: float) -> dict:
    return {
        "ttft_s": round(bound.ttft_s, 3),
        "ttft_over_floor": round(bound.ttft_s / floor_s, 3),
        "num_steps": bound.num_steps,
        "num_steps_over_target": bound.num_steps_over_target,
        "first_over_target_prefix_tokens": bound.first_over_target_prefix_tokens,
        "max_step_ms": round(1e3 * bound.max_step_s, 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", required=True, help="a measured latency profile of the 8B shape on one H200")
    ap.add_argument("--prompt-tokens", type=int, default=262144)
    ap.add_argument("--num-decodes", type=int, default=32)
    ap.add_argument("--decode-context", type=int, default=1024)
    ap.add_argument("--tbt-slo-ms", type=float, default=30.0)
    ap.add_argument("--out", required=True)
    ns = ap.parse_args(argv)
    wall = time.perf_counter()
    profile = load_profile(ns.profile)
    shape = profile.key.shape
    models = {
        "roofline H200": RooflineLatencyModel(shape, Layout(), H200),
        f"profile {ns.profile}": profile.model,
    }
    n, d, k, slo_s = ns.prompt_tokens, ns.num_decodes, ns.decode_context, ns.tbt_slo_ms / 1e3
    floor_s = prompt_flops_floor_s(shape, n, H200)
    results = {}
    for name, model in models.items():
        bound = best_ttft_under_tbt(model, n, d, k, slo_s)
        needed = slo_for_ttft_s(model, n, d, k, FLOOR_FACTOR * floor_s, lo_s=0.005, hi_s=1.0)
        results[name] = {
            "scenario": summary(bound, floor_s) | {
                "unconstrained_s": round(bound.unconstrained_s, 3),
                "within_1_3x_floor": bound.ttft_s <= FLOOR_FACTOR * floor_s,
                "checkpoints": [{"prefix_tokens": c["prefix_tokens"], "chunk_tokens": c["chunk_tokens"],
                                 "step_ms": round(1e3 * c["step_s"], 2)} for c in bound.checkpoints],
            },  # fmt: skip
            "tbt_target_ms_needed_for_1_3x_floor": None if needed is None else round(1e3 * needed, 1),
            "sweep": [
                {"num_decodes": nd, "tbt_slo_ms": 1e3 * t} | summary(best_ttft_under_tbt(model, n, nd, k, t), floor_s)
                for nd in SWEEP_DECODES
                for t in SWEEP_TBT_S
            ],
        }
    what_if = {
        name: summary(best_ttft_under_tbt(with_coefficients(profile.model, replaced), n, d, k, slo_s), floor_s)
        | {"replaced_coefficients_s": replaced}
        for name, replaced in WHAT_IF.items()
    }
    out = {
        "label": "SIMULATED: latency-model predictions, no GPU ran this",
        "benchmark": "ttft_under_tbt",
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "command": "python -m benchmarks.ttft_under_tbt " + " ".join(sys.argv[1:] if argv is None else argv),
        "device": "CPU (the models are of one NVIDIA H200)",
        "shape": shape.to_dict(),
        "scenario": {"prompt_tokens": n, "num_decodes": d, "decode_context_tokens": k, "decodes_grow": True,
                     "tbt_slo_ms": ns.tbt_slo_ms},  # fmt: skip
        "prompt_flops_floor_s": round(floor_s, 3),
        "floor_note": "prompt FLOPs: linear layers at 800 TFLOP/s, causal attention at 590 TFLOP/s (bf16, H200)",
        "bar_s": round(FLOOR_FACTOR * floor_s, 3),
        "models": results,
        "what_if_profile": what_if,
        "profile_coefficients_s": dict(zip(GROUP_FEATURES, profile.model.group_coefficients_s, strict=True)),
        "elapsed_s": round(time.perf_counter() - wall, 1),
    }
    Path(ns.out).write_text(json.dumps(out, indent=1))
    for name, r in results.items():
        s = r["scenario"]
        print(f"{name}: bound {s['ttft_s']:.1f} s = {s['ttft_over_floor']:.2f} x floor {floor_s:.1f} s; "
              f"over target from prefix {s['first_over_target_prefix_tokens']}; "
              f"1.3x needs TBT >= {r['tbt_target_ms_needed_for_1_3x_floor']} ms", file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
