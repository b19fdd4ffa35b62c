"""Per-stage chunk times of a 4-stage sequence pipeline, measured on one GPU, and the SPP TTFT
they predict (issue 20, the one-GPU part).

    python -m benchmarks.spp_stage_times --out benchmarks/results/spp_stage_times_h200_DATE.json

A stage of spp=4 on the Llama-3-8B shape is 8 of its 32 layers. This runs a model of that
slice (the 8B shape with 8 layers, random weights, bf16, dummy load) through the real
executor and times one prefill chunk of c tokens after P keys (`profiling/profiler.measure`
over a `SyntheticPlanner` plan: submit -> result, median of --repeats after a warm-up) for
c in --chunks and P in the prefixes a pipeline prefilling the --contexts prompts sees::

    P = 0, N/8, N/4, N/2, 3N/4, N - c     for every N in --contexts (512K and 1M)

t_slice(c, P) is interpolated linearly in P between them (attention of a fixed chunk is
linear in P). The stage slice carries the embedding and the LM head of the sampled row
(stage 0 and stage 3 carry one each; about 0.3 ms, included in every stage here).

--check-full also times the whole 32-layer model at a few (c, P), to check that a
32-layer step is 4 slices (ratio_to_4_slices).

Prediction, for spp in 1, 2, 4: the engine's own Scheduler and KV manager on a virtual
clock (`simulator/engine.SimulatedEngine`) with the step timer

    micro-batch crossing all stages = 4 t_slice(c, P) + (spp - 1) t_send(c)
    t_send(c) = c x hidden x 2 bytes / --link-GBps          (assumed, not measured here)

and `StagePipeline` (each stage an equal share; a stage takes micro-batches in order).
Two dispatch rules: the engine's fixed in-flight count (pipeline_depth = spp), and
dispatch when stage 0 is free (unbounded depth: the next chunk waits only for stage 0).
Efficiency = T1 / (spp x T_spp); bubbles = T_spp - T1 / spp. T1 of a 1M prompt is
hypothetical (its KV does not fit one H200). Floors: `ttft_floor_s` / spp.
CPU smoke (tests): --shape tiny-llama --device cpu --contexts 256 --chunks 16,32 ...
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from mnemosyne.bench.long_context.engine import chunk_floor_s, ttft_floor_s
from mnemosyne.bench.long_context.run import (
    LONG_MAX_POSITIONS,
    SHAPES,
    device_info,
    write_model_dir,
    write_result,
)
from mnemosyne.config import ModelConfig
from mnemosyne.engine.args import EngineArgs
from mnemosyne.engine.llm_engine import LLMEngine
from mnemosyne.latency.composition import StepComposition
from mnemosyne.profiling.profiler import measure_all, synthetic_setup
from mnemosyne.profiling.synthetic import SyntheticSeq
from mnemosyne.simulator.engine import SimulatedEngine, run_trace
from mnemosyne.simulator.setup import device_spec, latency_model_for, simulated_engine_config
from mnemosyne.simulator.trace import TraceRequest

MAX_NUM_SEQS = 2  # one synthetic chunk per step


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(float(x)) for x in s.split(",")]  # noqa: E731
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--num-stages", type=int, default=4, help="stages of the pipeline whose slice is timed")
    ap.add_argument("--contexts", type=ints, default=[1 << 19, 1 << 20], help="prompt lengths N")
    ap.add_argument("--chunks", type=ints, default=[2048, 4096, 8192], help="chunk sizes c")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per point (after one warm-up)")
    ap.add_argument("--check-full", type=ints, default=[0, 1 << 17], help="prefixes timed on the whole model")
    ap.add_argument("--spps", type=ints, default=[1, 2, 4], help="pipeline sizes predicted")
    ap.add_argument("--link-GBps", type=float, default=400.0, help="stage-to-stage bandwidth (assumed)")
    ap.add_argument("--gpu", default="h200", help="device spec of the simulated deployment")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="auto: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--out", type=Path, default=None)
    return ap.parse_args(argv)


def prefixes_for(contexts: list[int], chunk: int) -> list[int]:
    """The prefixes P measured for chunk c: 0, N/8, N/4, N/2, 3N/4 and N - c of every N."""
    ps = {0}
    for n in contexts:
        ps |= {n // 8, n // 4, n // 2, 3 * n // 4, max(0, n - chunk)}
    return sorted(p for p in ps if p + chunk <= max(contexts))


def write_slice_dir(shape: str, root: Path, num_layers: int) -> Path:
    """The shape's config.json with `num_layers` layers (a model of one pipeline stage)."""
    full = write_model_dir(shape, root / "full", LONG_MAX_POSITIONS)
    cfg = json.loads((full / "config.json").read_text())
    cfg["num_hidden_layers"] = num_layers
    path = root / "slice"
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    return path


def _engine(model_dir: Path, ns: argparse.Namespace, max_tokens: int) -> LLMEngine:
    device = EngineArgs(device=ns.device).resolve_device()
    dtype = EngineArgs(dtype=ns.dtype).resolve_dtype(device)
    cfg = ModelConfig.from_pretrained(model_dir, dtype)
    slots = max_tokens + max(ns.chunks) + 16 * (MAX_NUM_SEQS + 2)
    args = EngineArgs(
        model=str(model_dir), load_format="dummy", dtype=str(dtype).removeprefix("torch."), device=device,
        max_num_batched_tokens=max(ns.chunks), chunk_size=max(ns.chunks), max_num_seqs=MAX_NUM_SEQS,
        kv_cache_memory_gb=slots * cfg.kv_bytes_per_token / 2**30 + 0.01, enable_prefix_caching=False,
        chunk_policy="fixed", scheduling_policy="fcfs",
    )  # fmt: skip
    return LLMEngine.from_args(args)


def time_chunks(model_dir: Path, ns: argparse.Namespace, points: list[tuple[int, int]]) -> list[dict]:
    """Median seconds of one chunk (c, P) through a fresh engine of `model_dir`."""
    engine = _engine(model_dir, ns, max(p + c for c, p in points))
    try:
        cfg = engine.config.model
        _, _, planner, capacity = synthetic_setup(engine)
        seqs = [(SyntheticSeq(c, p),) for c, p in points]
        assert all(c + p <= capacity for c, p in points), (points, capacity)
        samples = measure_all(engine.executor, planner, seqs, ns.repeats)
        out = []
        for (c, p), m in zip(points, samples, strict=True):
            floor = chunk_floor_s(cfg, c, p)
            out.append({"chunk": c, "prefix": p, "s": m.measured_s, "floor_s": floor, "ratio_to_floor": m.measured_s / floor})  # fmt: skip
            print(out[-1], flush=True)
        return out
    finally:
        engine.shutdown()
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def interpolate(points: list[tuple[int, float]], p: int) -> float:
    """Piecewise-linear t(P) through (P, t) points sorted by P (extrapolated at the ends)."""
    if len(points) == 1:
        return points[0][1]
    for (p0, t0), (p1, t1) in zip(points, points[1:], strict=False):
        if p <= p1:
            return t0 + (t1 - t0) * (p - p0) / (p1 - p0)
    (p0, t0), (p1, t1) = points[-2], points[-1]
    return t1 + (t1 - t0) * (p - p1) / (p1 - p0)


def predict_ttft_s(
    full_dir: Path, ns: argparse.Namespace, slice_times: list[tuple[int, float]], n: int, c: int, spp: int,
    depth: int | None,
) -> float:  # fmt: skip
    """TTFT of one n-token prompt on `spp` stages (the simulator's engine, measured stage times)."""
    cfg = ModelConfig.from_pretrained(full_dir, torch.bfloat16)
    send_s = c * cfg.hidden_size * 2 / (ns.link_GBps * 1e9)

    def step_s(comp: StepComposition) -> float:
        g = comp.groups[0]
        per_token = interpolate(slice_times, g.chunk_prefix_tokens) / c
        return ns.num_stages * per_token * g.num_tokens + (spp - 1) * send_s

    kv_gb = (
        n + 2 * c
    ) * cfg.kv_bytes_per_token / spp / 2**30 + 1  # a virtual budget: T1 at 1M is hypothetical
    args = EngineArgs(
        model=str(full_dir), spp=spp, pipeline_depth=depth, chunk_size=c, max_num_batched_tokens=c,
        max_num_seqs=MAX_NUM_SEQS, kv_cache_memory_gb=kv_gb, enable_prefix_caching=False,
        chunk_policy="fixed", scheduling_policy="fcfs", max_model_len=n + 1,
    )  # fmt: skip
    spec = device_spec(ns.gpu)
    config = simulated_engine_config(full_dir, args, spec)
    engine = SimulatedEngine(
        config, latency_model_for(config, spec)[0], "measured stage times", step_timer=step_s
    )
    run_trace(engine, [TraceRequest(0.0, n, 1)])
    return engine.requests["req-0"].token_times_s[0]


def predictions(full_dir: Path, ns: argparse.Namespace, measured: list[dict]) -> list[dict]:
    cfg = ModelConfig.from_pretrained(full_dir, torch.bfloat16)
    out = []
    for c in ns.chunks:
        times = [(m["prefix"], m["s"]) for m in measured if m["chunk"] == c]
        for n in ns.contexts:
            entry: dict = {"context": n, "chunk": c, "num_chunks": -(-n // c), "spp": {}}
            t1 = None
            for spp in ns.spps:
                row = {}
                for rule, depth in (("fixed_inflight", None), ("stage0_free", 1 << 20)):
                    t = predict_ttft_s(full_dir, ns, times, n, c, spp, depth)
                    t1 = t if spp == 1 and rule == "fixed_inflight" else t1
                    row[rule] = {"ttft_s": t}
                    if t1 is not None:
                        row[rule] |= {"efficiency": t1 / (spp * t), "bubbles_s": t - t1 / spp}
                row["floor_s"] = ttft_floor_s(cfg, n, c) / spp
                row["send_s_per_chunk"] = c * cfg.hidden_size * 2 / (ns.link_GBps * 1e9)
                entry["spp"][str(spp)] = row
            print(
                {
                    "context": n,
                    "chunk": c,
                    **{k: v["fixed_inflight"]["ttft_s"] for k, v in entry["spp"].items()},
                }
            )
            out.append(entry)
    return out


def run(ns: argparse.Namespace, argv: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        full_cfg = SHAPES[ns.shape]
        num_layers = full_cfg["num_hidden_layers"]
        if num_layers % ns.num_stages:
            raise ValueError(f"{num_layers} layers do not split into {ns.num_stages} stages")
        slice_dir = write_slice_dir(ns.shape, Path(tmp), num_layers // ns.num_stages)
        full_dir = Path(tmp) / "full" / ns.shape
        t0 = time.perf_counter()
        points = [(c, p) for c in ns.chunks for p in prefixes_for(ns.contexts, c)]
        slice_times = time_chunks(slice_dir, ns, points)
        check = []
        if ns.check_full:
            full_points = [(c, p) for c in ns.chunks for p in ns.check_full]
            full_times = time_chunks(full_dir, ns, full_points)
            for f in full_times:
                at_c = [(m["prefix"], m["s"]) for m in slice_times if m["chunk"] == f["chunk"]]
                s = interpolate(at_c, f["prefix"])
                check.append(f | {"slice_s": s, "ratio_to_4_slices": f["s"] / (ns.num_stages * s)})
        measured_s = time.perf_counter() - t0
        return {
            "benchmark": "spp_stage_times",
            "command": "python -m benchmarks.spp_stage_times " + shlex.join(argv),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "device": device_info(),
            "shape": ns.shape, "config": full_cfg, "num_stages": ns.num_stages,
            "stage_layers": num_layers // ns.num_stages,
            "floors": {"matmul_TFLOPs": 800, "attention_TFLOPs": 590},
            "assumed": {"link_GBps": ns.link_GBps, "note": "stage sends are not measured on one GPU"},
            "measure_s": measured_s,
            "stage_chunk_times": slice_times,
            "full_model_check": check,
            "predictions": predictions(full_dir, ns, slice_times),
        }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = parse_args(argv)
    write_result(run(ns, argv), ns.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
