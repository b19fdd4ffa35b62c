"""Latency-model validation: predicted vs measured step time on held-out random step compositions.

    python -m benchmarks.latency_validation --shape llama3-8b --out benchmarks/results/X.json --plot

Uses the profile cached for this GPU/shape/layout/dtype (run benchmarks.mixed_long_short or
`mnemosyne profile --grid quick` first), or --profile FILE. Held-out steps: 0-64 decodes at
random KV lengths plus one or two prefill chunks (32-4096 tokens) at random prefixes up to
the KV capacity, drawn with a seed different from the profile grid's; steps whose roofline
time exceeds --max-step-s are redrawn. Each is timed as the profile was (its `step_timing` and
`block_layout`; the engine's own for a profile that records none): a pipelined profile holds
what a step costs with async scheduling, its host work hidden behind the step before, so a
serial submit -> result time would charge it host time the engine does not spend (before
this, every step was timed serially: on an H200, session 19 f/, against the pipelined 8B
profile, median 3.7%, p95 16.2%, its largest errors all under-predictions). Reports median
and p95 absolute relative error.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.mixed_long_short import scheduling_engine_args
from mnemosyne.bench.long_context.run import SHAPES, write_model_dir
from mnemosyne.profiling.profiler import StepTiming
from mnemosyne.profiling.synthetic import BlockLayout


def random_steps(rng: random.Random, capacity: int, max_seqs: int, n: int, accept) -> list[tuple]:
    from mnemosyne.profiling.synthetic import SyntheticSeq

    steps: list[tuple] = []
    while len(steps) < n:
        b = rng.choice([0, 0, 1, 4, 16, 32, 64])
        b = min(b, max_seqs - 2)
        chunks = [rng.choice([32, 64, 128, 256, 512, 1024, 2048, 4096]) for _ in range(rng.choice([1, 1, 2]))]
        left = capacity - sum(chunks) - b
        kvs = [rng.randint(1, max(1, left // (4 * max(b, 1)))) for _ in range(b)]
        left -= sum(kvs)
        prefixes = [rng.randint(0, max(0, left // len(chunks))) for _ in chunks]
        seqs = (
            *(SyntheticSeq(1, kv) for kv in kvs),
            *(SyntheticSeq(c, p) for c, p in zip(chunks, prefixes, strict=True)),
        )
        if accept(list(seqs)):
            steps.append(seqs)
    return steps


def profile_timing(info: dict, engine_timing: StepTiming) -> tuple[StepTiming, BlockLayout]:
    """How the latency model's profile timed its steps: the `step_timing` and `block_layout` its
    record holds (`LatencyProfile.info`); the engine's own timing and contiguous blocks for a
    profile that records none, or for the roofline (no profile: an empty record)."""
    timing = StepTiming(info.get("step_timing", engine_timing.value))
    return timing, BlockLayout(info.get("block_layout", BlockLayout.CONTIGUOUS.value))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument(
        "--model-dir", type=Path, default=None, help="use this model instead of --shape (smoke tests)"
    )
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--profile", default=None)
    ap.add_argument("--num-steps", type=int, default=120)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-step-s", type=float, default=0.4)
    ap.add_argument("--kv-fraction", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=12345)
    ap.add_argument("--kv-cache-gb", type=float, default=None, help="KV budget (smoke tests on CPU)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--plot", action="store_true")
    ns = ap.parse_args(argv)

    from mnemosyne.engine.llm_engine import LLMEngine
    from mnemosyne.latency.profile_store import load_profile
    from mnemosyne.profiling.profiler import (
        default_step_timing,
        library_versions,
        measure_all,
        synthetic_setup,
    )

    model_dir = ns.model_dir or write_model_dir(ns.shape, Path(tempfile.mkdtemp()))
    args = scheduling_engine_args(model_dir, ns, kv_cache_memory_gb=ns.kv_cache_gb)
    engine = LLMEngine.from_args(args)
    model, source = engine.policies.latency_model, engine.policies.latency_source
    # source: the profile's path, or "roofline" (no profile)
    info = load_profile(source).info if Path(source).is_file() else {}
    timing, layout = profile_timing(info, default_step_timing(engine.config))
    key, roofline, planner, capacity = synthetic_setup(engine, layout, timing)
    rng = random.Random(ns.seed)
    steps = random_steps(rng, capacity, engine.config.scheduler.max_num_seqs, ns.num_steps,
                         lambda seqs: roofline.step_time_s(planner.composition(seqs)) <= ns.max_step_s)  # fmt: skip
    samples = measure_all(engine.executor, planner, steps, ns.repeats, timing)
    engine.shutdown()
    rows = []
    for m in samples:
        pred = model.step_time_s(m.composition)
        rows.append({"seqs": [[s.num_tokens, s.start] for s in m.seqs], "measured_s": m.measured_s,
                     "predicted_s": pred, "roofline_s": roofline.step_time_s(m.composition),
                     "abs_rel_error": abs(pred / m.measured_s - 1)})  # fmt: skip
    errs = sorted(r["abs_rel_error"] for r in rows)
    roof = sorted(abs(r["roofline_s"] / r["measured_s"] - 1) for r in rows)
    import torch

    res = {
        "benchmark": "latency_validation", "shape": ns.shape, "date": datetime.now(UTC).isoformat(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "device": library_versions(),
        "latency_source": source, "step_timing": timing.value, "block_layout": layout.value,
        "kv_capacity_tokens": capacity, "num_steps": len(rows),
        "median_abs_rel_error": statistics.median(errs), "p95_abs_rel_error": errs[int(0.95 * (len(errs) - 1))],
        "roofline_median_abs_rel_error": statistics.median(roof), "steps": rows,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(ns).items()},
    }  # fmt: skip
    print(json.dumps({k: v for k, v in res.items() if k != "steps"}, indent=1))
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps(res, indent=1))
    if ns.plot:
        plot(res, ns.out.with_suffix(".png"))
    return res


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    meas = [1e3 * r["measured_s"] for r in res["steps"]]
    ax.scatter(meas, [1e3 * r["predicted_s"] for r in res["steps"]], s=10, label="fitted profile")
    ax.scatter(meas, [1e3 * r["roofline_s"] for r in res["steps"]], s=6, alpha=0.5, label="roofline")
    lo, hi = min(meas), max(meas)
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set(xscale="log", yscale="log", xlabel="measured step (ms)", ylabel="predicted step (ms)",
           title=f"{res['shape']} on {res['gpu']}: median err {100 * res['median_abs_rel_error']:.1f}%, "
                 f"p95 {100 * res['p95_abs_rel_error']:.1f}%")  # fmt: skip
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
