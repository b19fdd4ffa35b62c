"""Refit a measured latency profile offline (no GPU) and cross-validate its feature sets.

    python -m benchmarks.refit_latency_profile --profile benchmarks/results/latency_profile_quick_h200_...json \
        [--out REFIT.json] [--report REPORT.json] [--block-size 64] [--validation VALIDATION.json]

A profile stores every measured step (`samples`: seqs = [query tokens, keys before them] per
sequence, measured_s), so the fit of `mnemosyne/latency/fitted.py` can be rerun on them with
other features. For each feature set (`VARIANTS`) this reports the fit's in-sample error and
its leave-one-out error (each sample predicted by a fit on all the others), overall and per
step kind:

    chunk     one prefill chunk alone        decode    decodes only
    mixed     decodes + one chunk

--out writes the profile refit with --variant (format 2, the same key and samples, predicted_s
recomputed, "refit" saying how). --validation: held-out measured steps predicted by each fit,
from a `benchmarks.latency_validation` result (possibly of other kernels: the report says which
file) or from an engine's step log (`--step-log FILE` of `mnemosyne serve`/`generate`: the steps a
real run served, `engine/step_log.py`; its warm-up steps, --skip-steps, are left out).
The kernel feature needs the backend's cost table and whether the cache took page-aligned
tiles: a CUDA profile of a 16-bit model with --block-size a multiple of 64 (the engine's
default, 64) did. Single KVP group profiles only (the samples do not store the group size).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from datetime import UTC, datetime
from pathlib import Path

from mnemosyne.engine.step_log import read_step_log
from mnemosyne.latency.composition import StepComposition
from mnemosyne.latency.fitted import FittedLatencyModel, fit_latency_model
from mnemosyne.latency.profile_store import LatencyProfile, load_profile, save_profile
from mnemosyne.profiling.profiler import chunk_attention_cost
from mnemosyne.profiling.synthetic import SyntheticPlanner, SyntheticSeq

POLYNOMIAL = frozenset({"prefix_tokens", "prefix_pairs", "causal_pairs", "chunks"})
VARIANTS = {
    "format1": frozenset({"kernel_chunk_key_s"}),  # the features before the kernel term
    "kernel_keys": frozenset(),  # format 2: every feature (what `mnemosyne profile` fits)
    "kernel_keys_no_polynomial": POLYNOMIAL,  # the kernel term in place of the c, P polynomial
}


def step_kind(seqs: list[list[int]]) -> str:
    chunks = sum(1 for n, _ in seqs if n > 1)
    if not chunks:
        return "decode"
    return "chunk" if len(seqs) == 1 else "mixed"


def compositions(samples: list[dict], block_size: int) -> list[StepComposition]:
    planner = SyntheticPlanner(block_size, (1 << 40,), None)
    return [planner.composition([SyntheticSeq(n, p) for n, p in s["seqs"]]) for s in samples]


def error_summary(errors: list[float], kinds: list[str]) -> dict:
    def summary(e: list[float]) -> dict:
        a = sorted(abs(x) for x in e)
        return {"n": len(a), "median_abs_rel": statistics.median(a), "p95_abs_rel": a[min(len(a) - 1, int(0.95 * len(a)))],
                "max_abs_rel": a[-1], "mean_rel": statistics.fmean(e)}  # fmt: skip

    out = {"all": summary(errors)}
    for kind in sorted(set(kinds)):
        out[kind] = summary([e for e, k in zip(errors, kinds, strict=True) if k == kind])
    return out


def fit(pairs, profile: LatencyProfile, attention, excluded) -> FittedLatencyModel:
    return fit_latency_model(pairs, profile.key.layout, profile.model.knee_tokens, None, attention, excluded)


def leave_one_out(pairs, profile, attention, excluded) -> list[float]:
    errors = []
    for i, (comp, measured_s) in enumerate(pairs):
        model = fit(pairs[:i] + pairs[i + 1 :], profile, attention, excluded)
        errors.append(model.step_time_s(comp) / measured_s - 1)
    return errors


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", required=True)
    p.add_argument("--out", help="write the refit profile here (format 2)")
    p.add_argument("--variant", default="kernel_keys", choices=sorted(VARIANTS))
    p.add_argument("--report", help="write the cross-validation report JSON here")
    p.add_argument("--block-size", type=int, default=64, help="the profiled engine's KV block size")
    p.add_argument("--validation", help="a latency_validation result or a step log to predict (held-out steps)")
    p.add_argument("--skip-steps", type=int, default=16, help="a step log's first steps left out (warm-up)")
    ns = p.parse_args(argv)

    profile = load_profile(ns.profile)
    if profile.key.layout.kvp != 1:
        raise SystemExit("refit handles single-KVP-group profiles only")
    shape = profile.key.shape
    if shape.dtype_bytes > 2:
        raise SystemExit("the kernel feature is for CUDA profiles of 16-bit models")
    attention = chunk_attention_cost(shape, profile.key.layout, ns.block_size)
    samples = profile.info["samples"]
    pairs = list(zip(compositions(samples, ns.block_size), [s["measured_s"] for s in samples], strict=True))
    kinds = [step_kind(s["seqs"]) for s in samples]
    held_out = load_held_out(ns.validation, ns.skip_steps) if ns.validation else None

    report: dict = {"profile": ns.profile, "block_size": ns.block_size, "variants": {}}
    per_sample = {}
    for name, excluded in VARIANTS.items():
        model = fit(pairs, profile, attention, excluded)
        in_sample = [model.step_time_s(c) / t - 1 for c, t in pairs]
        loo = leave_one_out(pairs, profile, attention, excluded)
        entry = {
            "excluded": sorted(excluded),
            "coefficients": model.to_dict()["group_features"],
            "in_sample": error_summary(in_sample, kinds),
            "leave_one_out": error_summary(loo, kinds),
        }
        if held_out is not None:
            steps = held_out["steps"]
            comps = compositions(steps, ns.block_size)
            v = [model.step_time_s(c) / s["measured_s"] - 1 for c, s in zip(comps, steps, strict=True)]
            entry["validation"] = {"file": ns.validation, **error_summary(v, [step_kind(s["seqs"]) for s in steps])}
        report["variants"][name] = entry
        per_sample[name] = (in_sample, loo)
        print(f"{name:24s} in-sample median {pct(entry['in_sample']['all'])}  LOO {pct(entry['leave_one_out']['all'])}"
              + (f"  validation {pct(entry['validation']['all'])}" if held_out else ""))  # fmt: skip
        for kind in sorted(set(kinds)):
            print(f"    {kind:7s} LOO {pct(entry['leave_one_out'][kind])}")

    report["samples"] = [
        {"seqs": s["seqs"] if len(s["seqs"]) <= 3 else f"{len(s['seqs']) - 1} decodes + {s['seqs'][-1]}",
         "kind": k, "measured_s": s["measured_s"],
         **{f"{name}_loo_rel": per_sample[name][1][i] for name in VARIANTS}}  # fmt: skip
        for i, (s, k) in enumerate(zip(samples, kinds, strict=True))
    ]
    print(f"\n{'step':44s} {'measured':>9s} " + " ".join(f"{n[:14]:>14s}" for n in VARIANTS) + "   (LOO error)")
    for row in report["samples"]:
        print(f"{str(row['seqs'])[:44]:44s} {1e3 * row['measured_s']:7.2f}ms "
              + " ".join(f"{100 * row[f'{n}_loo_rel']:+13.1f}%" for n in VARIANTS))  # fmt: skip

    command = "python -m benchmarks.refit_latency_profile " + shlex.join(argv if argv is not None else sys.argv[1:])
    report["command"] = command
    if ns.report:
        Path(ns.report).write_text(json.dumps(report, indent=1))
    if ns.out:
        model = fit(pairs, profile, attention, VARIANTS[ns.variant])
        errors = sorted(abs(model.step_time_s(c) / t - 1) for c, t in pairs)
        info = dict(profile.info)
        info["samples"] = [s | {"predicted_s": model.step_time_s(c)} for s, (c, _) in zip(samples, pairs, strict=True)]
        info["fit_error"] = {"median_rel": statistics.median(errors), "p95_rel": errors[min(len(errors) - 1, int(0.95 * len(errors)))]}
        info["refit"] = {
            "from": ns.profile, "variant": ns.variant, "command": command,
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "leave_one_out": report["variants"][ns.variant]["leave_one_out"]["all"],
            "note": "SIMULATED-side artefact: coefficients refit offline on the source profile's measured samples",
        }  # fmt: skip
        save_profile(LatencyProfile(profile.key, model, info), Path(ns.out))
        print(f"wrote {ns.out}")
    return 0


def load_held_out(path: str, skip_steps: int) -> dict:
    """{"steps": [{"seqs", "measured_s"}, ...]} from a latency_validation result or a step log."""
    try:
        _, steps = read_step_log(path)
    except ValueError:  # not a step log: a latency_validation result (one JSON document)
        return json.loads(Path(path).read_text())
    return {"steps": [s for s in steps[skip_steps:] if s["seqs"] and s["measured_s"] > 0]}


def pct(s: dict) -> str:
    return f"{100 * s['median_abs_rel']:.1f}% p95 {100 * s['p95_abs_rel']:.1f}% max {100 * s['max_abs_rel']:.1f}% (n={s['n']})"


if __name__ == "__main__":
    raise SystemExit(main())
