"""GPU: the measurements that validate the simulator on one lease and one code (about 4-5 minutes
for the 8B shape on one H200).

    python -m benchmarks.simulate_validation_measure --out-dir OUT \
        [--configs fixed2048,fixed512,adaptive_lars] [--long-len 262144]

One engine, set up as `benchmarks.mixed_long_short` sets it up (dummy weights, 8192 + 256 token
budget, KV fraction 0.9, prefix caching off):

  1. two quick profiles of it, contiguous block tables (the engine's run-aware placement keeps
     a long prompt in one run), timed pipelined (the engine's async steps; what `mnemosyne
     profile` now measures by default) and serial:
     OUT/latency_profile_quick_contiguous_{pipelined,serial}.json
  2. the mixed scenario (32 decodes at 1K, then one --long-len prompt) for each config, the
     engine predicting with the pipelined profile: OUT/mixed_long_short.json, the same format
     as `benchmarks.mixed_long_short` writes, plus per config every step the engine ran while
     the prompt prefilled (`steps`): [submitted_s, result_s, predicted_s, its GroupLoad], times
     from the long prompt's arrival, so that each step's measured time can be set beside any
     profile's prediction of its own composition.

Then on CPU (seconds):

    python -m benchmarks.simulate_validation --measured-run OUT/mixed_long_short.json \
        --run-profiles OUT/latency_profile_quick_contiguous_pipelined.json,OUT/latency_profile_quick_contiguous_serial.json \
        --out-dir OUT/validation
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path


def record_steps(engine) -> list[list]:
    """Wrap the engine's `predict_step` and its executor's `get_result` (results come back in
    submission order) to record [submitted_s, result_s, predicted_s, GroupLoad as a dict] per step."""
    steps: list[list] = []
    pending: list[list] = []
    predict, get_result = engine.predict_step, engine.executor.get_result

    def predict_step(sched):
        composition, predicted_s = predict(sched)
        load = dataclasses.asdict(composition.groups[0])
        pending.append([time.monotonic(), None, predicted_s, load])
        return composition, predicted_s

    def result():
        out = get_result()
        if pending:
            row = pending.pop(0)
            row[1] = time.monotonic()
            steps.append(row)
        return out

    engine.predict_step = predict_step
    engine.executor.get_result = result
    return steps


def main(argv: list[str] | None = None) -> int:
    from benchmarks.mixed_long_short import run_config, scheduling_engine_args
    from mnemosyne.bench.long_context.engine import ttft_floor_s
    from mnemosyne.bench.long_context.run import write_model_dir
    from mnemosyne.engine.llm_engine import LLMEngine
    from mnemosyne.latency.profile_store import save_profile
    from mnemosyne.profiling.profiler import GridKind, StepTiming, library_versions, profile_engine
    from mnemosyne.profiling.synthetic import BlockLayout

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, required=True)
    ap.add_argument("--configs", default="fixed2048,fixed512,adaptive_lars")
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--long-len", type=int, default=262144)
    ap.add_argument("--short-len", type=int, default=1024)
    ap.add_argument("--num-short", type=int, default=32)
    ap.add_argument("--short-max-tokens", type=int, default=8192)
    ap.add_argument("--tbt-slo-ms", type=float, default=30.0)
    ap.add_argument("--kv-fraction", type=float, default=0.9)
    ap.add_argument("--model-dir", type=Path, default=None, help="use this model instead of --shape (smoke tests)")
    ap.add_argument("--grid", default=GridKind.QUICK.value, help="profile grid (tiny: smoke tests)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="auto")
    ns = ap.parse_args(argv)
    ns.profile = None
    ns.out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = ns.model_dir or write_model_dir(ns.shape, Path(tempfile.mkdtemp()))
    args = scheduling_engine_args(model_dir, ns, chunk_policy="adaptive", tbt_slo_ms=ns.tbt_slo_ms,
                                  enable_prefix_caching=False)  # fmt: skip
    engine = LLMEngine.from_args(args)
    t0 = time.monotonic()
    try:
        profiles = {}
        for timing in (StepTiming.PIPELINED, StepTiming.SERIAL):
            profile = profile_engine(engine, GridKind(ns.grid), print, BlockLayout.CONTIGUOUS, timing)
            path = ns.out_dir / f"latency_profile_quick_contiguous_{timing.value}.json"
            save_profile(profile, path)
            profiles[timing.value] = str(path)
            print(f"wrote {path} ({profile.info['elapsed_s']} s)", flush=True)
        # the runs predict with the pipelined profile (use_policies rebuilds the policies from the config)
        engine.config = dataclasses.replace(
            engine.config, policy=dataclasses.replace(engine.config.policy, latency_profile=profiles["pipelined"])
        )
        steps = record_steps(engine)
        import torch

        results: dict = {
            "benchmark": "mixed_long_short", "shape": ns.shape, "date": datetime.now(UTC).isoformat(),
            "device": library_versions(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "command": "python -m benchmarks.simulate_validation_measure " + " ".join(argv or []),
            "args": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(ns).items()},
                     "profile": profiles["pipelined"]},
            "profiles": profiles,
            "long_ttft_floor_s": ttft_floor_s(engine.config.model, ns.long_len, ns.long_len),
            "runs": [],
        }  # fmt: skip
        out = ns.out_dir / "mixed_long_short.json"
        for name in ns.configs.split(","):
            steps.clear()
            res = run_config(engine, name, ns)
            # from the step that took the long prompt's first chunk (the shorts all decode beside it)
            first = next((i for i, s in enumerate(steps)
                          if s[3]["num_chunks"] and s[3]["num_decodes"] >= ns.num_short), 0)  # fmt: skip
            t_first = steps[first][0] if steps else 0.0
            res["steps"] = [[round(s[0] - t_first, 5), round(s[1] - t_first, 5), s[2], s[3]] for s in steps[first:]]
            results["runs"].append(res)
            results["latency_source"] = engine.policies.latency_source
            out.write_text(json.dumps(results))  # after every run: a cut-off run keeps the rest
            print(f"{name}: long TTFT {res['long_ttft_s']:.2f} s, TBT {res['short_tbt']}, {len(res['steps'])} steps",
                  flush=True)  # fmt: skip
    finally:
        engine.shutdown()
    print(f"wrote {out} in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
