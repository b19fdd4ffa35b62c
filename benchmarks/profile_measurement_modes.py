"""GPU: the quick profile of the mixed scenario's engine under each measurement mode, to test
why the simulator misses the measured mixed scenario and serving trace (see
benchmarks/results/simulated/README.md, "Latency-model refit with the kernel term").

    python -m benchmarks.profile_measurement_modes --out-dir OUT [--modes contiguous:serial,...]

One engine, set up as `benchmarks.mixed_long_short` sets it up (dummy weights, 8192 + 256
token budget, kv fraction 0.9: the same profile key and grid), profiled once per mode:

    contiguous:serial     today's `mnemosyne profile` (one block run per sequence, one step
                          in flight): reproduces latency_profile_quick_h200_2026-11-29_session4
    scattered:serial      no block run: the cuDNN path gathers every prefix, as in the engine
                          once a long prompt's blocks interleave with its decodes'
    contiguous:pipelined  two steps in flight, as with async scheduling
    scattered:pipelined   both

Each writes OUT/latency_profile_quick_<layout>_<timing>.json. Then on CPU, per file:

    python -m benchmarks.simulate_mixed --measured benchmarks/results/mixed_long_short_h200_2026-11-29_session4.json \
        --profile OUT/latency_profile_quick_<...>.json --out OUT/mixed_vs_simulated_<...>.json
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

MODES = ("contiguous:serial", "scattered:serial", "contiguous:pipelined", "scattered:pipelined")


def main(argv: list[str] | None = None) -> int:
    from benchmarks.mixed_long_short import scheduling_engine_args
    from mnemosyne.bench.long_context.run import write_model_dir
    from mnemosyne.engine.llm_engine import LLMEngine
    from mnemosyne.latency.profile_store import save_profile
    from mnemosyne.profiling.profiler import GridKind, StepTiming, profile_engine
    from mnemosyne.profiling.synthetic import BlockLayout

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, required=True)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--kv-fraction", type=float, default=0.9)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="auto")
    ns = ap.parse_args(argv)
    ns.profile = None  # scheduling_engine_args reads it: no latency profile for the engine itself
    modes = [m.split(":") for m in ns.modes.split(",")]
    model_dir = write_model_dir(ns.shape, Path(tempfile.mkdtemp()))
    engine = LLMEngine.from_args(scheduling_engine_args(model_dir, ns, chunk_policy="fixed"))
    ns.out_dir.mkdir(parents=True, exist_ok=True)
    try:
        for layout, timing in modes:
            profile = profile_engine(engine, GridKind.QUICK, print, BlockLayout(layout), StepTiming(timing))
            path = ns.out_dir / f"latency_profile_quick_{layout}_{timing}.json"
            save_profile(profile, path)
            err = profile.info["fit_error"]
            print(f"wrote {path}: {profile.info['elapsed_s']} s, fit median {100 * err['median_rel']:.1f}% "
                  f"p95 {100 * err['p95_rel']:.1f}%", flush=True)  # fmt: skip
    finally:
        engine.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
