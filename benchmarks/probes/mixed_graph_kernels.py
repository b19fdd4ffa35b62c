"""GPU time per kernel of one short chunk step, through the piecewise graphs (attention
eager) and through the mixed-step graphs (`worker/mixed_graph.py`, attention on a fixed
plan), from torch.profiler's device times (one GPU, dummy weights):

    python -m benchmarks.probes.mixed_graph_kernels --shape llama3-8b --cases 32:131072 --out DIR
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from mnemosyne.bench.long_context.engine import _median_s, synthetic_meta
from mnemosyne.bench.long_context.run import write_model_dir
from mnemosyne.engine.args import EngineArgs
from mnemosyne.engine.llm_engine import LLMEngine
from mnemosyne.worker import mixed_graph


class NotFitting(Exception):
    """The step does not fit the mixed-step graphs."""


def _runner(worker, meta, ids, pos, mixed: bool):
    def step() -> None:
        meta.backend_plan = None
        if mixed:
            out = worker.mixed.try_run(ids, pos, meta)
            if out is None:
                raise NotFitting
        else:
            worker.piecewise.run(ids, pos, worker.kv_caches, meta)
        torch.cuda.synchronize()

    return step


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--cases", default="32:131072", help="chunk:prefix,...")
    p.add_argument("--kv-fraction", type=float, default=0.5)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--max-mixed-graph-tokens", type=int, default=None,
                   help="A/B: the mixed-step graphs' largest step instead of the worker's")
    p.add_argument("--no-profiler", action="store_true", help="wall times only (no torch.profiler pass)")
    ns = p.parse_args()
    if ns.max_mixed_graph_tokens is not None:
        mixed_graph.MAX_MIXED_GRAPH_TOKENS = ns.max_mixed_graph_tokens
    model_dir = write_model_dir(ns.shape, Path(tempfile.mkdtemp()))
    args = EngineArgs(model=str(model_dir), load_format="dummy", dtype="bfloat16", chunk_size=2048,
                      max_num_batched_tokens=2048, max_num_seqs=40, kv_cache_memory_fraction=ns.kv_fraction)  # fmt: skip
    engine = LLMEngine.from_args(args)
    worker = engine.executor.worker
    ns.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in ns.cases.split(","):
        c, prefix = map(int, case.split(":"))
        meta = synthetic_meta(c, prefix, engine.config.cache.block_size)
        ids = torch.ones(c, dtype=torch.long, device="cuda")
        pos = torch.arange(prefix, prefix + c, device="cuda")
        for mixed in (False, True):
            step = _runner(worker, meta, ids, pos, mixed)
            name = f"c{c}_p{prefix}_{'mixed' if mixed else 'piecewise'}"
            try:
                wall_s = _median_s(step, 5)
            except NotFitting:
                rows.append({"case": name, "fits": False})
                print(rows[-1], flush=True)
                continue
            if ns.no_profiler:
                rows.append({"case": name, "wall_ms": wall_s * 1e3})
                print(rows[-1], flush=True)
                continue
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    step()
            table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=25)
            (ns.out / f"{name}.txt").write_text(table)
            gpu_us = sum(e.self_device_time_total for e in prof.key_averages()) / 3
            rows.append({"case": name, "wall_ms": wall_s * 1e3, "device_ms_per_step": gpu_us / 1e3})
            print(rows[-1], flush=True)
            print(table[:3000], flush=True)
    (ns.out / "summary.json").write_text(json.dumps(rows, indent=1))
    engine.shutdown()


if __name__ == "__main__":
    main()
