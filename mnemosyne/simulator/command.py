"""`mnemosyne simulate` and `mnemosyne plan`: arguments and entry points."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
import time
from pathlib import Path

from mnemosyne.engine.args import EngineArgs
from mnemosyne.errors import ConfigError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory (config.json is enough)")
    p.add_argument("--gpu", default="h200", help="h200, h100 (or cpu): the DeviceSpec of the roofline")


STEP_FACTORS = ("chunk_step_factor", "idle_step_factor")


def add_step_factor_args(p: argparse.ArgumentParser) -> None:
    """--chunk-step-factor and --idle-step-factor: where the simulated device departs from the
    latency model, as a serving step log measures it (`benchmarks.step_log_report`); for
    `mnemosyne simulate` and the benchmarks that drive it (`step_factor_argv` passes them on)."""
    p.add_argument(
        "--chunk-step-factor", type=float, default=1.0,
        help="simulated steps with a prefill chunk take this x more (sustained-load clocks: the "
        "median measured/predicted of such steps in a serving step log, `benchmarks.step_log_report`)",
    )  # fmt: skip
    p.add_argument(
        "--idle-step-factor", type=float, default=1.0,
        help="the first step after the engine idled takes this x more when it carries a prefill chunk "
        "(its host launches are not hidden behind a step before it: the median measured/predicted of "
        "such steps in a serving step log, `benchmarks.step_log_report`)",
    )  # fmt: skip
    p.add_argument(
        "--device-step-log", default=None,
        help="time the simulated device's steps by this serving step log, measured with --latency-profile: "
        "per prefix bucket the median measured/predicted of its steps with a chunk, its idle-start steps' "
        "median, a draw from its decode-only steps' ratios (simulator/device_log.py; replaces the factors above)",
    )  # fmt: skip
    p.add_argument("--device-seed", type=int, default=0, help="seeds --device-step-log's decode-step draws")
    p.add_argument(
        "--arrival-delay-ms", type=float, default=0.0,
        help="each request reaches the scheduler this long after its arrival, its TTFT still counted from the "
        "arrival: the server's HTTP path, the engine core's input and the first token's way back "
        "(`benchmarks.ttft_decomposition` measures it from a serving run)",
    )  # fmt: skip


def step_factor_argv(ns: argparse.Namespace) -> list[str]:
    """The arguments of `add_step_factor_args` that differ from their defaults, as a command line."""
    defaults = argparse.ArgumentParser()
    add_step_factor_args(defaults)
    out: list[str] = []
    for name, default in vars(defaults.parse_args([])).items():
        if getattr(ns, name) != default:
            out += ["--" + name.replace("_", "-"), str(getattr(ns, name))]
    return out


def add_simulate_args(p: argparse.ArgumentParser) -> None:
    from mnemosyne.cli_args import add_policy_args, add_prefill_lane_args

    _add_model_args(p)
    p.add_argument("--trace", required=True, help='JSONL: {"arrival_s", "prompt_len", "output_len"} per line')
    p.add_argument("--out", required=True, help="result JSON (requests and summary)")
    p.add_argument("--plot", default=None, help="PNG of TTFT and max TBT per request")
    p.add_argument("--ttft-slo-s", type=float, default=None, help="TTFT SLO for the attainment figure")
    p.add_argument(
        "--latency-error-factor", type=float, default=1.0,
        help="simulated steps take this x the latency model's prediction (a known systematic error)",
    )  # fmt: skip
    add_step_factor_args(p)
    p.add_argument(
        "--device-latency-profile", default=None,
        help="the simulated device's step times come from this profile (e.g. one measured in the "
        "engine's conditions), while the engine's policies predict with --latency-profile and "
        "calibrate online against them (default: the device takes the engine's predictions)",
    )  # fmt: skip
    d = EngineArgs()
    g = p.add_argument_group("engine (as for `mnemosyne serve`)")
    g.add_argument(
        "--max-model-len",
        type=int,
        default=d.max_model_len,
        help="default: the model's max_position_embeddings, raised to the trace's longest request",
    )
    g.add_argument("--block-size", type=int, default=d.block_size)
    g.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens)
    g.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    g.add_argument("--chunk-size", type=int, default=d.chunk_size)
    g.add_argument("--kv-cache-memory-gb", type=float, default=None, help="per GPU (default: what is left)")
    g.add_argument("--tp", type=int, default=1)
    g.add_argument("--spp", type=int, default=1)
    g.add_argument("--kvp", type=int, default=1)
    g.add_argument("--max-tokens-per-kvp-group", type=int, default=None)
    g.add_argument("--pipeline-depth", type=int, default=None, help="micro-batches in flight (default: spp)")
    g.add_argument(
        "--async-scheduling", action=argparse.BooleanOptionalAction, default=d.async_scheduling,
        help="two steps in flight with spp == 1, as the engine runs (arrivals wait for the planned step)",
    )  # fmt: skip
    add_prefill_lane_args(p, d)  # (the lane on the virtual clock: simulator/lane.py)
    add_policy_args(p, d)


def simulate_engine_args(ns: argparse.Namespace) -> EngineArgs:
    names = (
        "max_model_len", "block_size", "max_num_batched_tokens", "max_num_seqs", "chunk_size",
        "kv_cache_memory_gb", "tp", "spp", "kvp", "max_tokens_per_kvp_group", "pipeline_depth",
        "chunk_policy", "scheduling_policy", "tbt_slo_ms", "prefill_only_step_ms", "latency_profile", "long_prefill_threshold",
        "deadline_factor", "min_deadline_s", "chunk_granularity", "min_chunk_tokens", "online_calibration",
        "tbt_slo_quantile", "graph_sized_steps", "async_scheduling", "prefill_lane_free_sms",
        "prefill_lane_max_free_sms", "prefill_lane_min_tokens", "prefill_lane_chunk_tokens",
    )  # fmt: skip
    return EngineArgs(model=ns.model, enable_prefix_caching=False, **{n: getattr(ns, n) for n in names})


def run_simulation(ns: argparse.Namespace, record_steps: bool = False):  # -> tuple[SimulatedEngine, dict]
    """The simulation `mnemosyne simulate` runs for parsed arguments `ns`: the engine after the
    trace (its requests' token times; with `record_steps`, every step in `engine.steps`) and the
    result JSON (requests, summary, setup)."""
    from mnemosyne.simulator.device_log import DeviceLog, LoggedDevice
    from mnemosyne.simulator.engine import SimulatedEngine, run_trace, scaled_timer
    from mnemosyne.simulator.report import summarize
    from mnemosyne.simulator.setup import (
        device_spec,
        latency_model_for,
        load_model_config,
        matching_profile_model,
        simulated_engine_config,
    )
    from mnemosyne.simulator.trace import load_trace

    spec = device_spec(ns.gpu)
    trace = load_trace(ns.trace)
    args = simulate_engine_args(ns)
    if args.max_model_len is None:  # the model's limit, raised to the trace's longest request
        longest = max(t.prompt_len + t.output_len for t in trace)
        args = dataclasses.replace(
            args, max_model_len=max(longest, load_model_config(ns.model).max_position_embeddings)
        )
    config = simulated_engine_config(ns.model, args, spec)
    model, source = latency_model_for(config, spec)
    for name in ("latency_error_factor", *STEP_FACTORS):
        if getattr(ns, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(ns, name)}")
    if ns.arrival_delay_ms < 0:
        raise ConfigError(f"--arrival-delay-ms must be >= 0, got {ns.arrival_delay_ms}")
    device_path = ns.device_latency_profile
    timed = device_path is not None or ns.latency_error_factor != 1.0 or ns.chunk_step_factor != 1.0
    logged = None
    if ns.device_step_log is not None:
        if timed or ns.idle_step_factor != 1.0:
            raise ConfigError(
                "--device-step-log times the device itself: not with --device-latency-profile, "
                "--latency-error-factor, --chunk-step-factor or --idle-step-factor"
            )
        logged = LoggedDevice(DeviceLog.from_step_log(ns.device_step_log), ns.device_seed)
    device = model if device_path is None else matching_profile_model(config, device_path, spec)
    timer = scaled_timer(device, ns.latency_error_factor, ns.chunk_step_factor) if timed else None
    engine = SimulatedEngine(
        config, model, source, step_timer=timer, record_steps=record_steps,
        idle_step_factor=ns.idle_step_factor, device=logged, gpu=spec,
    )  # fmt: skip
    # a request the engine refuses raises its InvalidRequestError
    run_trace(engine, trace, ns.arrival_delay_ms / 1e3)
    result = summarize(engine, config.policy.tbt_slo_s, ns.ttft_slo_s)
    p = config.parallel
    result["setup"] = {
        "simulated": True,
        "model": str(ns.model),
        "gpu": spec.name,
        "latency_model": source,
        "layout": {"tp": p.tp, "spp": p.spp, "kvp": p.kvp, "pipeline_depth": p.max_inflight},
        "max_tokens_per_kvp_group": config.cache.max_tokens_per_kvp_group,
        "num_blocks_per_group": config.cache.num_blocks_per_group[0],
        "chunk_policy": config.policy.chunk_policy.value,
        "scheduling_policy": config.policy.scheduling_policy.value,
        "online_calibration": config.policy.online_calibration,
        "tbt_slo_quantile": config.policy.tbt_slo_quantile,
        "max_decoding_step_tokens": config.policy.max_decoding_step_tokens,
        "async_scheduling": config.scheduler.async_scheduling,
        "prefill_lane": None if engine.lane is None else {
            "steps_sms_choices": list(engine.lane.choices), "num_sms": spec.num_sms,
            "chunks_by_steps_sms": {str(k): v for k, v in sorted(engine.lane.num_chunks_by_steps_sms.items())},
        },
        "latency_error_factor": ns.latency_error_factor,
        "chunk_step_factor": ns.chunk_step_factor,
        "idle_step_factor": ns.idle_step_factor,
        "device_step_log": None if logged is None else {**logged.log.summary(), "seed": ns.device_seed},
        "arrival_delay_ms": ns.arrival_delay_ms,
        "device_latency_model": source if device_path is None else str(device_path),
        "command": "mnemosyne " + " ".join(sys.argv[1:]),
    }
    return engine, result


def cmd_simulate(ns: argparse.Namespace) -> int:
    from mnemosyne.simulator.report import plot

    if ns.plot and importlib.util.find_spec("matplotlib") is None:  # before the run, not after it
        raise ConfigError("--plot needs matplotlib: pip install 'mnemosyne[bench]'")
    wall = time.perf_counter()
    _, result = run_simulation(ns)
    Path(ns.out).write_text(json.dumps(result, indent=1))
    if ns.plot:
        plot(result, ns.plot)
    s = result["summary"]
    print(
        f"simulated {s['num_requests']} requests, {s['num_steps']} steps in "
        f"{time.perf_counter() - wall:.1f} s: TTFT p50 {s['ttft_s']['p50']:.3f} s, "
        f"TBT p99 {(s['tbt_s']['p99'] or 0) * 1e3:.1f} ms, SLO attainment {s['slo']['attainment']:.2%} -> {ns.out}",
        file=sys.stderr,
    )
    return 0


def add_plan_args(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    p.add_argument("--num-gpus", type=int, required=True)
    p.add_argument("--context-len", type=int, required=True, help="tokens of the one long request")
    p.add_argument("--tbt-slo-ms", type=float, default=30.0)
    p.add_argument(
        "--prefill-only-step-ms", type=float, default=EngineArgs().prefill_only_step_ms,
        help="the step target of a prompt prefilling alone (its TTFT)",
    )  # fmt: skip
    p.add_argument("--ttft-slo-s", type=float, default=None)
    p.add_argument("--block-size", type=int, default=EngineArgs().block_size)
    p.add_argument(
        "--latency-profile", action="append", default=[],
        help="a measured profile, for its own layout and those it transfers to (repeat: one per TP degree)",
    )  # fmt: skip
    p.add_argument("--format", choices=["table", "json"], default="table")


def cmd_plan(ns: argparse.Namespace) -> int:
    from mnemosyne.latency.profile_store import load_profile
    from mnemosyne.simulator.planner import format_table, plan
    from mnemosyne.simulator.setup import device_spec, load_model_config

    if ns.tbt_slo_ms <= 0:
        raise ConfigError(f"--tbt-slo-ms must be positive, got {ns.tbt_slo_ms}")
    result = plan(
        load_model_config(ns.model),
        ns.num_gpus,
        ns.context_len,
        device_spec(ns.gpu),
        ns.tbt_slo_ms / 1000.0,
        ns.ttft_slo_s,
        ns.block_size,
        [load_profile(path) for path in ns.latency_profile],
        ns.prefill_only_step_ms / 1000.0,
    )
    print(json.dumps(result, indent=1) if ns.format == "json" else format_table(result))
    return 0
