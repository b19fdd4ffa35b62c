"""Short requests decoding while one long prompt prefills, on one GPU (random weights of a real shape).

    python -m benchmarks.mixed_long_short --shape llama3-8b --long-len 262144 --out benchmarks/results/X.json

32 requests (1K-token prompts) are decoding; then one long prompt arrives. While it
prefills we record every gap between the short requests' tokens (TBT) and the long
request's TTFT, for each configuration:

    fixed64        chunk_policy=fixed, chunk_size=64,   fcfs
    fixed128       chunk_policy=fixed, chunk_size=128,  fcfs
    fixed512       chunk_policy=fixed, chunk_size=512,  fcfs
    fixed2048      chunk_policy=fixed, chunk_size=2048, fcfs
    adaptive_fcfs  chunk_policy=adaptive (tbt_slo_ms), fcfs
    adaptive_lars  chunk_policy=adaptive, lars (space sharing)
    adaptive_lars_eager_steps    adaptive_lars with steps past the largest CUDA graph allowed
                                 while requests decode (graph_sized_steps=False)
    adaptive_fcfs_uncalibrated   adaptive_fcfs without the online calibration of the latency model
    adaptive_lars_lane           adaptive_lars with the prefill lane (engine/prefill_lane.py): the
                                 long prompt in --prefill-lane-chunk-tokens chunks beside the
                                 decodes' steps, which each chunk leaves --prefill-lane-free-sms
                                 to --prefill-lane-max-free-sms SMs

Adaptive runs also report the calibration's corrections at the end (`calibration`) and the
steps whose first prefill took a 16-token chunk or overshot the target (`min_progress`).
Every run reports which path the worker's steps took while the long prompt prefilled
(`step_paths`: mixed-step graph replays, steps the mixed graphs could not take, piecewise
replays; beside `num_steps_with_chunks`).

One engine serves every configuration (its policies are swapped between runs). The
latency model is a quick profile measured first on the same engine (`--grid quick`,
about 2 minutes) unless --profile names one. Floors: the long prefill's FLOPs at
800 TFLOP/s (linear layers) and 590 TFLOP/s (attention), as in mnemosyne/bench/long_context/engine.py.
Writes JSON (and a PNG next to it with --plot).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from mnemosyne.bench.long_context.engine import random_prompt, ttft_floor_s
from mnemosyne.bench.long_context.run import SHAPES, write_model_dir
from mnemosyne.engine.args import EngineArgs, max_decoding_step_tokens

CONFIGS = {
    "fixed64": dict(chunk_policy="fixed", chunk_size=64, scheduling_policy="fcfs"),
    "fixed128": dict(chunk_policy="fixed", chunk_size=128, scheduling_policy="fcfs"),
    "fixed512": dict(chunk_policy="fixed", chunk_size=512, scheduling_policy="fcfs"),
    "fixed2048": dict(chunk_policy="fixed", chunk_size=2048, scheduling_policy="fcfs"),
    "adaptive_fcfs": dict(chunk_policy="adaptive", chunk_size=None, scheduling_policy="fcfs"),
    "adaptive_lars": dict(chunk_policy="adaptive", chunk_size=None, scheduling_policy="lars"),
    "adaptive_lars_g16": dict(chunk_policy="adaptive", chunk_size=None, scheduling_policy="lars", chunk_granularity=16),
    "adaptive_lars_eager_steps": dict(
        chunk_policy="adaptive", chunk_size=None, scheduling_policy="lars", graph_sized_steps=False
    ),
    "adaptive_fcfs_uncalibrated": dict(
        chunk_policy="adaptive", chunk_size=None, scheduling_policy="fcfs", online_calibration=False
    ),
    "adaptive_lars_lane": dict(chunk_policy="adaptive", chunk_size=None, scheduling_policy="lars", prefill_lane=True),
}


def pcts(xs: list[float]) -> dict:
    if not xs:
        return {}
    s = sorted(xs)
    return {"n": len(s), "p50_ms": 1e3 * statistics.median(s), "p99_ms": 1e3 * s[min(len(s) - 1, int(0.99 * len(s)))],
            "max_ms": 1e3 * s[-1], "mean_ms": 1e3 * statistics.fmean(s)}  # fmt: skip


def scheduling_engine_args(model_dir: Path, ns: argparse.Namespace, **overrides):  # -> EngineArgs
    """The engine this benchmark and `latency_validation` both measure (dummy weights, one
    device, a step budget of 8192 + 256 tokens): the same setup, so the same profile key."""
    return EngineArgs(
        model=str(model_dir), load_format="dummy", dtype=ns.dtype, device=ns.device,
        max_num_batched_tokens=8192 + 256, max_num_seqs=256, kv_cache_memory_fraction=ns.kv_fraction,
        latency_profile=ns.profile, **overrides,
    )  # fmt: skip


def use_policies(engine, cfg: dict, tbt_slo_ms: float, tbt_slo_quantile: float, lane=None) -> None:
    """Swap the engine's chunk and priority policies, and the prefill lane (`lane`, a
    PrefillLaneConfig, for configurations with prefill_lane; the engine must have been started
    with one). The engine must be idle."""
    from mnemosyne.config_policy import ChunkPolicyKind, SchedulingPolicyKind
    from mnemosyne.engine.policies import make_policies

    config = engine.config
    policy = dataclasses.replace(
        config.policy,
        chunk_policy=ChunkPolicyKind(cfg["chunk_policy"]),
        scheduling_policy=SchedulingPolicyKind(cfg["scheduling_policy"]),
        tbt_slo_s=tbt_slo_ms / 1e3,
        online_calibration=cfg.get("online_calibration", True),
        chunk_granularity_tokens=cfg.get("chunk_granularity", EngineArgs.chunk_granularity),
        tbt_slo_quantile=tbt_slo_quantile,
        max_decoding_step_tokens=max_decoding_step_tokens(
            config.device, config.enforce_eager, config.scheduler.max_num_batched_tokens,
            cfg.get("graph_sized_steps", True),
        ),
    )
    if cfg.get("prefill_lane") and engine.lane is None:
        raise SystemExit(f"{cfg}: start the benchmark with --prefill-lane-free-sms N")
    scheduler = dataclasses.replace(
        config.scheduler, chunk_size=cfg["chunk_size"], prefill_lane=lane if cfg.get("prefill_lane") else None
    )
    engine.config = dataclasses.replace(config, policy=policy, scheduler=scheduler)
    engine.scheduler.config = scheduler
    engine.policies = make_policies(engine.config, engine.kv_manager)
    engine.scheduler.chunk_policy = engine.policies.chunk_policy
    engine.scheduler.priority = engine.policies.priority
    if engine.lane is not None and engine.policies.lane_split is not None:
        engine.lane.split, engine.lane.beside = engine.policies.lane_split, engine.policies.lane_split.beside


def step_paths(engine) -> dict[str, int]:
    """How many steps the worker ran through each graph kind so far (one in-process device;
    steps that none of these took ran eagerly); mixed-step graphs with those of the prefill
    lane's splits."""
    worker = getattr(engine.executor, "worker", None)
    if worker is None:
        return {}
    lane_mixed = list(worker.lane.mixed_graphs.values()) if worker.lane is not None else []
    out = {}
    for name, graphs, field in (("mixed_graph", worker.mixed, "num_replays"),
                                ("mixed_not_fitting", worker.mixed, "num_not_fitting"),
                                ("piecewise", worker.piecewise, "num_replays")):  # fmt: skip
        if graphs is not None:
            out[name] = getattr(graphs, field) + sum(getattr(g, field) for g in lane_mixed if name != "piecewise")
    return out


def run_config(engine, name: str, ns: argparse.Namespace) -> dict:
    from mnemosyne import SamplingParams
    from mnemosyne.config import PrefillLaneConfig

    lane = PrefillLaneConfig(
        ns.prefill_lane_free_sms, ns.prefill_lane_min_tokens, ns.prefill_lane_chunk_tokens, ns.prefill_lane_max_free_sms
    )
    use_policies(engine, CONFIGS[name], ns.tbt_slo_ms, ns.tbt_slo_quantile, lane)
    short_params = SamplingParams(temperature=0, max_tokens=ns.short_max_tokens, ignore_eos=True)
    vocab = engine.config.model.vocab_size
    # Made before any step (not engine work), as the engine core receives a served prompt: an
    # int32 array (its unpacked frame), not a list of Python ints (`core_arrival_cost`)
    long_prompt = np.asarray(random_prompt(ns.long_len, seed=7, max_id=vocab), dtype=np.int32)
    shorts = [
        engine.add_request(random_prompt(ns.short_len, seed=100 + i, max_id=vocab), short_params)
        for i in range(ns.num_short)
    ]
    latest: dict[str, object] = {}
    while sum(1 for rid in shorts if len(getattr(latest.get(rid), "token_ids", [])) >= 2) < len(shorts):
        for out in engine.step():
            latest[out.request_id] = out
    engine.take_step_stats()
    paths_before = step_paths(engine)
    t_arrival = time.monotonic()
    long_id = engine.add_request(long_prompt, SamplingParams(temperature=0, max_tokens=1))
    long_out = None
    while long_out is None or not long_out.finished:
        for out in engine.step():
            latest[out.request_id] = out
            if out.request_id == long_id:
                long_out = out
    t_first = long_out.timing.first_token_time
    steps = engine.take_step_stats()
    paths = {k: v - paths_before.get(k, 0) for k, v in step_paths(engine).items()}
    gaps = []
    for rid in shorts:
        times = latest[rid].timing.token_times
        gaps += [b - a for a, b in zip(times, times[1:], strict=False) if a >= t_arrival and b <= t_first]
        engine.abort(rid)
    ratios = sorted(s.predicted_s / s.actual_s for s in steps if s.actual_s > 0)
    chunks = [n for s in steps for n in s.chunk_sizes]
    ttft = t_first - t_arrival
    res = {
        "config": name, **CONFIGS[name], "max_decoding_step_tokens": engine.config.policy.max_decoding_step_tokens,
        "long_ttft_s": ttft, "short_tbt": pcts(gaps),
        "num_steps": len(steps), "step_time_ratio_p50": ratios[len(ratios) // 2] if ratios else None,
        "chunk_tokens_min": min(chunks, default=0), "chunk_tokens_max": max(chunks, default=0),
        "num_steps_with_chunks": sum(1 for s in steps if s.chunk_sizes), "step_paths": paths,
        "tbt_timeline": [[round(b - t_arrival, 4), round(b - a, 5)] for a, b in zip(
            latest[shorts[0]].timing.token_times, latest[shorts[0]].timing.token_times[1:], strict=False)
            if a >= t_arrival and b <= t_first],
    }  # fmt: skip
    if engine.policies.calibration is not None:
        res["calibration"] = engine.policies.calibration.snapshot()
    if CONFIGS[name].get("prefill_lane"):
        res["lane_chunks"] = engine.scheduler.num_lane_chunks
        res["lane_steps_sms_choices"] = list(engine.lane.choices)
        res["lane_chunks_by_steps_sms"] = {str(k): v for k, v in sorted(engine.lane.num_chunks_by_steps_sms.items())}
        res["lane_steps_scale"] = engine.lane.beside.scale
    policy = engine.policies.chunk_policy
    if hasattr(policy, "num_overshoots"):
        res["min_progress"] = {
            "num_small_chunks": policy.num_small_chunks,
            "num_overshoots": policy.num_overshoots,
        }
    print(json.dumps({k: v for k, v in res.items() if k != "tbt_timeline"}), flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--long-len", type=int, default=262144)
    ap.add_argument("--short-len", type=int, default=1024)
    ap.add_argument("--num-short", type=int, default=32)
    ap.add_argument("--short-max-tokens", type=int, default=8192)
    ap.add_argument("--tbt-slo-ms", type=float, default=30.0)
    ap.add_argument(
        "--tbt-slo-quantile", type=float, default=EngineArgs.tbt_slo_quantile,
        help="adaptive chunks: see `mnemosyne generate --help`",
    )  # fmt: skip
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument(
        "--profile", default=None, help="latency profile JSON (default: measure a quick one first)"
    )
    ap.add_argument(
        "--prefill-lane-free-sms", type=int, default=0,
        help="start the engine with a prefill lane leaving N SMs free (for adaptive_lars_lane)",
    )  # fmt: skip
    ap.add_argument("--prefill-lane-chunk-tokens", type=int, default=EngineArgs.prefill_lane_chunk_tokens)
    ap.add_argument("--prefill-lane-min-tokens", type=int, default=EngineArgs.prefill_lane_min_tokens)
    ap.add_argument("--prefill-lane-max-free-sms", type=int, default=None, help="default: 2 x --prefill-lane-free-sms")
    ap.add_argument("--kv-fraction", type=float, default=0.9)
    ap.add_argument(
        "--model-dir", type=Path, default=None, help="use this model instead of --shape (smoke tests)"
    )
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--plot", action="store_true")
    ap.add_argument("--step-log", default=None, help="write every step to this JSON-lines file (engine/step_log.py)")
    ns = ap.parse_args()

    from mnemosyne.engine.llm_engine import LLMEngine
    from mnemosyne.gc_heap import freeze_startup_heap
    from mnemosyne.latency.profile_store import profiles_dir, save_profile
    from mnemosyne.models.default_model import cache_dir
    from mnemosyne.profiling.profiler import GridKind, library_versions, profile_engine

    model_dir = ns.model_dir or write_model_dir(ns.shape, Path(tempfile.mkdtemp()))
    args = scheduling_engine_args(
        model_dir, ns, chunk_policy="adaptive", tbt_slo_ms=ns.tbt_slo_ms,
        enable_prefix_caching=False,  # every configuration prefills the same prompts from scratch
        step_log=ns.step_log, prefill_lane_free_sms=ns.prefill_lane_free_sms,
        prefill_lane_chunk_tokens=ns.prefill_lane_chunk_tokens, prefill_lane_max_free_sms=ns.prefill_lane_max_free_sms,
    )  # fmt: skip
    engine = LLMEngine.from_args(args)
    freeze_startup_heap()  # as the served engine core does once ready (mnemosyne/gc_heap.py)
    results: dict = {"benchmark": "mixed_long_short", "shape": ns.shape, "date": datetime.now(UTC).isoformat(),
                     "device": library_versions(), "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(ns).items()}}  # fmt: skip
    if ns.profile is None:
        profile = profile_engine(engine, GridKind.QUICK)
        path = profiles_dir(cache_dir()) / profile.key.file_name()
        save_profile(profile, path)
        save_profile(profile, ns.out.with_suffix(".profile.json"))
        results["profile"] = {
            "path": str(path),
            **profile.info["fit_error"],
            "elapsed_s": profile.info["elapsed_s"],
        }
    import torch

    results["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    cfg = engine.config.model
    results["long_ttft_floor_s"] = ttft_floor_s(cfg, ns.long_len, ns.long_len)
    results["runs"] = []
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    for name in ns.configs.split(","):
        results["runs"].append(run_config(engine, name, ns))
        results["latency_source"] = engine.policies.latency_source  # the model the runs used
        ns.out.write_text(json.dumps(results, indent=1))  # after every run: a cut-off run keeps the rest
    engine.shutdown()
    print(f"wrote {ns.out}")
    if ns.plot:
        plot(results, ns.out.with_suffix(".png"))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, 4.5))
    for run in results["runs"]:
        tl = run["tbt_timeline"]
        ax0.plot([t for t, _ in tl], [1e3 * g for _, g in tl], lw=0.8, label=run["config"])
    ax0.axhline(results["args"]["tbt_slo_ms"], color="k", ls="--", lw=0.8, label="TBT SLO")
    ax0.set(xlabel="seconds since the long prompt arrived", ylabel="short request TBT (ms)", yscale="log",
            title=f"{results['shape']}, {results['args']['long_len']}-token prompt + {results['args']['num_short']} decodes")  # fmt: skip
    ax0.legend()
    names = [r["config"] for r in results["runs"]]
    x = range(len(names))
    ax1.bar(
        [i - 0.2 for i in x],
        [r["short_tbt"].get("p99_ms", 0) for r in results["runs"]],
        0.4,
        label="TBT p99 (ms)",
    )
    ax1b = ax1.twinx()
    ax1b.bar(
        [i + 0.2 for i in x],
        [r["long_ttft_s"] for r in results["runs"]],
        0.4,
        color="C1",
        label="long TTFT (s)",
    )
    ax1b.axhline(results["long_ttft_floor_s"], color="C1", ls="--", lw=0.8, label="TTFT floor")
    ax1.set_xticks(list(x), names)
    ax1.set_ylabel("TBT p99 (ms)")
    ax1b.set_ylabel("long TTFT (s)")
    fig.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
