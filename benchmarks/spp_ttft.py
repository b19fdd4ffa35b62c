"""Measured TTFT of one long prompt on a multi-GPU layout (sequence pipeline, TP, KVP).

    python -m benchmarks.spp_ttft --context 524288 --layouts spp1,spp2 --out benchmarks/results/spp_ttft_h200x2_DATE.json

Random Llama-3-8B shape (llama3 rope, positions declared to 16M), bf16, dummy weights,
NCCL between the worker processes, fixed chunks of --chunk tokens in FCFS order. Each
layout (`tp2`, `spp2`, `spp2xkvp2`, ...; `@D` sets the micro-batches in flight, e.g.
`spp2@4`; default spp) runs in its own process, so one layout's memory never limits the
next::

    start the engine (workers, weights, KV cache, CUDA graphs)      -> startup_s
    one warm-up request (two chunks, then one token)
    add the N-token prompt (max_tokens=1) and step until its token  -> ttft_s
                                             every step's return time -> step gaps

Reported beside each TTFT:
  floor_1gpu_s   `ttft_floor_s`: FLOPs / peak of every chunk (800 TFLOP/s matmuls,
                 590 TFLOP/s attention) on one GPU
  floor_s        floor_1gpu_s / world size (perfect scaling of the same work)
  efficiency     T(first layout) / (world x T): the scaling efficiency against the first
                 layout given (give spp1 first)
  bubbles_s      T - T(first) / world: what the pipeline fill, drain and stage sends add
  send_s         computed, not measured: chunk x hidden x 2 bytes per stage boundary per
                 chunk at 360 GB/s (P2P), summed over the prompt

With SPP, the engine keeps `pipeline_depth` micro-batches in flight (default spp): a
stage-0 chunk of the same prompt is dispatched as soon as one in flight returns. A
larger depth dispatches before stage 0 is free, so stage 0 never waits for the driver;
`spp2@4` measures that rule beside the default.
CPU smoke (tests): --shape tiny-llama --device cpu --context 300 --chunk 64 --layouts spp1,spp2
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mnemosyne.bench.long_context.engine import random_prompt, ttft_floor_s
from mnemosyne.bench.long_context.run import (
    LONG_MAX_POSITIONS,
    SHAPES,
    device_info,
    write_model_dir,
    write_result,
)
from mnemosyne.bench.long_context.run import parse_layout as parse_layout_sizes
from mnemosyne.config import ModelConfig
from mnemosyne.engine.args import EngineArgs
from mnemosyne.engine.llm_engine import LLMEngine
from mnemosyne.sampling_params import SamplingParams

P2P_BPS = 360e9


def parse_layout(text: str) -> dict[str, int | None]:
    """'spp2xkvp2@4' -> {'tp': 1, 'spp': 2, 'kvp': 2, 'pipeline_depth': 4}."""
    name, at, depth = text.partition("@")
    if at and not depth.isdigit():
        raise SystemExit(f"bad layout {text!r}: expected e.g. spp2, tp2xspp2, spp2@4")
    return {**parse_layout_sizes(name), "pipeline_depth": int(depth) if depth else None}


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--context", type=lambda s: int(float(s)), default=1 << 19, help="prompt tokens N")
    ap.add_argument("--chunk", type=int, default=4096, help="fixed prefill chunk (and token budget)")
    ap.add_argument("--layouts", default="spp1,spp2", help="comma-separated; the first is the baseline")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="auto: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--layout-timeout-s", type=float, default=900.0)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--step-log-dir", type=Path, default=None,
        help="each layout writes DIR/LAYOUT.steps.jsonl (the engine's step log: every step's host time, path, cuDNN chunks)",
    )  # fmt: skip
    ap.add_argument("--one-layout", help=argparse.SUPPRESS)
    ap.add_argument("--one-out", type=Path, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def run_layout(ns: argparse.Namespace, model_dir: Path, name: str) -> dict:
    """Startup, warm-up and the long prompt's TTFT on one engine of this layout."""
    layout = parse_layout(name)
    step_log = None
    if ns.step_log_dir is not None:
        ns.step_log_dir.mkdir(parents=True, exist_ok=True)
        step_log = str(ns.step_log_dir / f"{name}.steps.jsonl")
    t0 = time.perf_counter()
    kvp = layout["kvp"] or 1
    block = EngineArgs().block_size
    per_group = -(-(ns.context + 2 * ns.chunk) // (kvp * block)) * block if kvp > 1 else None
    args = EngineArgs(
        model=str(model_dir), load_format="dummy", device=ns.device, dtype=ns.dtype,
        chunk_size=ns.chunk, max_num_batched_tokens=ns.chunk, max_num_seqs=4,
        max_model_len=ns.context + 64, enable_prefix_caching=False,
        chunk_policy="fixed", scheduling_policy="fcfs", max_tokens_per_kvp_group=per_group,
        tp=layout["tp"], spp=layout["spp"], kvp=kvp, pipeline_depth=layout["pipeline_depth"],
        step_log=step_log,
    )  # fmt: skip
    engine = LLMEngine.from_args(args)
    try:
        startup_s = time.perf_counter() - t0
        vocab = engine.config.model.vocab_size
        params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
        engine.add_request(random_prompt(2 * ns.chunk, seed=1, max_id=vocab), params)
        while engine.has_unfinished_requests():
            engine.step()
        engine.add_request(random_prompt(ns.context, seed=2, max_id=vocab), params)
        stamps = [time.perf_counter()]
        while engine.has_unfinished_requests():
            engine.step()
            stamps.append(time.perf_counter())
        ttft_s = stamps[-1] - stamps[0]
        gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    finally:
        engine.shutdown()
    return {
        "startup_s": startup_s, "ttft_s": ttft_s, "num_steps": len(gaps),
        "step_gap_s": {"first": gaps[0], "median": statistics.median(gaps), "max": max(gaps)},
        "step_gaps_s": [round(g, 6) for g in gaps],  # every step's return after the one before, in order
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ns = parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="spp_ttft_"))
    model_dir = write_model_dir(ns.shape, root, LONG_MAX_POSITIONS)
    if ns.one_layout is not None:
        ns.one_out.write_text(json.dumps(run_layout(ns, model_dir, ns.one_layout)))
        return 0
    device = EngineArgs(device=ns.device).resolve_device()
    cfg = ModelConfig.from_pretrained(model_dir, EngineArgs(dtype=ns.dtype).resolve_dtype(device))
    floor_1gpu = ttft_floor_s(cfg, ns.context, ns.chunk)
    num_chunks = -(-ns.context // ns.chunk)
    rows: list[dict] = []
    for text in ns.layouts.split(","):
        layout = parse_layout(text)
        world = layout["tp"] * layout["spp"] * layout["kvp"]
        one_out = root / f"{text}.json"
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.spp_ttft",
            *argv,
            "--one-layout",
            text,
            "--one-out",
            str(one_out),
        ]
        print(f"[{text}] {shlex.join(cmd)}", flush=True)
        try:
            proc = subprocess.run(cmd, timeout=ns.layout_timeout_s)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        row: dict = {"layout": text, **layout, "world_size": world, "floor_1gpu_s": floor_1gpu}
        row["floor_s"] = floor_1gpu / world
        row["send_s"] = (layout["spp"] - 1) * num_chunks * ns.chunk * cfg.hidden_size * 2 / P2P_BPS
        if rc != 0 or not one_out.exists():
            row["error"] = f"layout process ended with {rc}"
        else:
            row |= json.loads(one_out.read_text())
            row["ratio_to_floor"] = row["ttft_s"] / row["floor_s"]
            base = next((r for r in rows if "ttft_s" in r), None)
            if base is not None:
                row["efficiency"] = base["ttft_s"] * base["world_size"] / (world * row["ttft_s"])
                row["bubbles_s"] = row["ttft_s"] - base["ttft_s"] * base["world_size"] / world
        print(json.dumps({k: v for k, v in row.items() if k != "step_gaps_s"}), flush=True)
        rows.append(row)
        result = {
            "benchmark": "spp_ttft", "date": datetime.date.today().isoformat(), "device": device_info(),
            "command": "python -m benchmarks.spp_ttft " + shlex.join(argv), "shape": ns.shape,
            "context": ns.context, "chunk": ns.chunk, "num_chunks": num_chunks, "torch": torch.__version__,
            "layouts": rows,
        }  # fmt: skip
        write_result(result, ns.out)  # after every layout, so a cut run keeps what it measured
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
