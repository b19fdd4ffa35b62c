"""Whole-model chunk steps as the serving engine runs them: through `LLMEngine`'s executor,
timed serially and pipelined (random weights of a real shape, one GPU).

    python -m benchmarks.chunk_steps_pipelined --shape llama3-8b --out OUT.json

`benchmarks.chunk_sweep` times one chunk's forward (+ the LM head of its last row) through the
worker's graphs, synchronizing after each, so the host work of each step (its plan, the
attention metadata, the copies into the graphs' buffers) adds to its time. Served with async
scheduling, that host work runs while the step before is on the device. Here every step is a
real `StepPlan` through the engine's executor (the path the engine picks: mixed-step graphs,
piecewise graphs or eager), made by the profiler's synthetic planner, and timed both ways
(`mnemosyne/profiling/profiler.py`):

    serial      submit -> result of one step at a time (the median of --repeats)
    pipelined   result -> next result with two copies of the step in flight: what the step
                costs the engine between two tokens of a co-batched decode

Cells: one chunk of c tokens after P keys for c in --chunks and P in --prefixes (skipped where
P + c exceeds the KV capacity), and on the 8B shape the mixed step (32 decodes at 1K keys +
one 128-token chunk after 256K keys). Floors as `chunk_sweep`'s: max(FLOPs at 800 / 590
TFLOP/s, bytes of the weights and every key at 4.2 TB/s).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.mixed_long_short import scheduling_engine_args
from mnemosyne.bench.long_context.engine import MIXED_STEP, chunk_bytes_floor_s, chunk_floor_s, mixed_floor_s
from mnemosyne.bench.long_context.run import SHAPES, write_model_dir

PREFIXES = {"llama3-8b": (131072, 524288, 870000), "llama3.2-1b": (131072, 1048576, 3000000)}


def cell(name: str, seqs: list, flop_s: float, byte_s: float, serial, pipelined) -> dict:
    floor_s = max(flop_s, byte_s)
    row = {"step": name, "flop_floor_s": flop_s, "bytes_floor_s": byte_s, "floor_s": floor_s,
           "serial_s": serial.measured_s, "pipelined_s": pipelined.measured_s,
           "serial_ratio": serial.measured_s / floor_s, "pipelined_ratio": pipelined.measured_s / floor_s,
           "seqs": seqs}  # fmt: skip
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--model-dir", type=Path, default=None, help="use this model instead of --shape (smoke tests)")
    ap.add_argument("--prefixes", default=None, help="P,... (default: the shape's)")
    ap.add_argument("--chunks", default="16,32,64,128,256")
    ap.add_argument("--mixed", action=argparse.BooleanOptionalAction, default=None,
                    help="also the mixed step (default: on for llama3-8b)")  # fmt: skip
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--kv-fraction", type=float, default=0.9)
    ap.add_argument("--kv-cache-gb", type=float, default=None, help="KV budget (smoke tests on CPU)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, required=True)
    ns = ap.parse_args(argv)
    ns.profile = None  # nothing is predicted here

    from mnemosyne.engine.llm_engine import LLMEngine
    from mnemosyne.profiling.profiler import (
        StepTiming,
        library_versions,
        measure,
        measure_pipelined,
        synthetic_setup,
    )
    from mnemosyne.profiling.synthetic import BlockLayout, SyntheticSeq

    prefixes = [int(p) for p in ns.prefixes.split(",")] if ns.prefixes else list(PREFIXES.get(ns.shape, ()))
    chunks = [int(c) for c in ns.chunks.split(",")]
    # max_model_len sizes the mixed-step graphs' block tables: a step past it runs on the
    # piecewise graphs, which a served engine never does (it admits no longer request)
    max_positions = max(1 << 21, 1 << (max(prefixes, default=0) + max(chunks)).bit_length())
    model_dir = ns.model_dir or write_model_dir(ns.shape, Path(tempfile.mkdtemp()), max_positions)
    engine = LLMEngine.from_args(scheduling_engine_args(model_dir, ns, kv_cache_memory_gb=ns.kv_cache_gb))
    cfg = engine.config.model
    _, _, planner, capacity = synthetic_setup(engine, BlockLayout.CONTIGUOUS, StepTiming.PIPELINED)
    executor = engine.executor
    prefixes = prefixes or [capacity // 2]
    rows = []

    def timed(name: str, seqs: list, floors: tuple[float, float]) -> None:
        serial = measure(executor, planner, seqs, ns.repeats)
        pipelined = measure_pipelined(executor, planner, seqs, ns.repeats)
        rows.append(cell(name, [[s.num_tokens, s.start] for s in seqs], *floors, serial, pipelined))

    for p in prefixes:
        for c in chunks:
            if p + c > min(capacity, engine.config.scheduler.max_model_len):
                continue
            timed(f"c={c} after {p}", [SyntheticSeq(c, p)], (chunk_floor_s(cfg, c, p), chunk_bytes_floor_s(cfg, c, p)))
    n_dec, ctx, c, p = MIXED_STEP
    if (ns.mixed if ns.mixed is not None else ns.shape == "llama3-8b") and n_dec * ctx + p + c <= capacity:
        seqs = [SyntheticSeq(1, ctx) for _ in range(n_dec)] + [SyntheticSeq(c, p)]
        timed(f"{n_dec} decodes at {ctx} + c={c} after {p}", seqs, mixed_floor_s(cfg, n_dec, ctx, c, p))
    executor.submit(planner.retire_plan())
    executor.get_result()
    engine.shutdown()
    import torch

    res = {
        "benchmark": "chunk_steps_pipelined", "shape": ns.shape, "date": datetime.now(UTC).isoformat(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "device": library_versions(),
        "kv_capacity_tokens": capacity, "steps": rows,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(ns).items()},
    }  # fmt: skip
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps(res, indent=1))
    print(f"wrote {ns.out}")
    return res


if __name__ == "__main__":
    main()
