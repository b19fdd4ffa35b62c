"""Is a step of more than `MAX_PIECEWISE_TOKENS` tokens GPU-bound? For whole prompts of c
tokens (no prefix) on one GPU with dummy weights, the model forward plus the LM head row:

    launch_ms   host time until the forward returns (nothing synchronised): the launch cost
    gpu_ms      CUDA events around it: the device's time (waiting for launches included)
    wall_ms     both, with a synchronisation after

eager (the engine's path above the piecewise cap) and through piecewise graphs captured here
up to the largest case (what a higher cap would run), median of 7. Plus cProfile (tottime)
of three eager forwards of the first case.

    python -m benchmarks.probes.eager_launch_host --shape llama3.2-1b --cases 1206,2048,4096,8448 --out DIR
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.probes.host_profile import cprofile_tottime
from mnemosyne.bench.long_context.engine import synthetic_meta
from mnemosyne.bench.long_context.run import write_model_dir
from mnemosyne.engine.args import EngineArgs
from mnemosyne.engine.llm_engine import LLMEngine
from mnemosyne.worker.piecewise_graph import PiecewiseGraphs


def time_forward(fn: Callable[[], object], iters: int = 7) -> dict[str, float]:
    """Median launch / device / wall milliseconds of `fn` started on an idle device."""
    launch, gpu, wall = [], [], []
    fn()
    for _ in range(iters):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        fn()
        end.record()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        launch.append(t1 - t0)
        gpu.append(start.elapsed_time(end) / 1e3)
        wall.append(t2 - t0)
    return {
        k: statistics.median(v) * 1e3 for k, v in (("launch_ms", launch), ("gpu_ms", gpu), ("wall_ms", wall))
    }


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="llama3.2-1b")
    p.add_argument("--cases", default="1206,2048,4096,8448", help="prompt lengths")
    p.add_argument("--out", type=Path, required=True)
    ns = p.parse_args()
    cases = [int(c) for c in ns.cases.split(",")]
    model_dir = write_model_dir(ns.shape, Path(tempfile.mkdtemp()), 1 << 17)
    args = EngineArgs(model=str(model_dir), load_format="dummy", dtype="bfloat16", chunk_size=max(cases),
                      max_num_batched_tokens=max(cases), max_num_seqs=16, kv_cache_memory_fraction=0.3)  # fmt: skip
    engine = LLMEngine.from_args(args)
    worker = engine.executor.worker
    model, caches, bs = worker.model, worker.kv_caches, engine.config.cache.block_size
    t0 = time.perf_counter()
    graphs = PiecewiseGraphs(model, -(-max(cases) // 8) * 8, torch.device("cuda"))
    graphs.sizes = sorted({*graphs.sizes, *(-(-c // 8) * 8 for c in cases)})
    graphs.capture_all()
    capture_s = time.perf_counter() - t0
    ns.out.mkdir(parents=True, exist_ok=True)
    rows, texts = [], []
    for c in cases:
        meta = synthetic_meta(c, 0, bs)
        pos = torch.arange(c, device="cuda")
        ids = torch.ones(c, dtype=torch.long, device="cuda")

        def eager(meta=meta, ids=ids, pos=pos) -> None:
            meta.backend_plan = None
            model.compute_logits(model(ids, pos, caches, meta)[-1:])

        def piecewise(meta=meta, ids=ids, pos=pos) -> None:
            meta.backend_plan = None
            model.compute_logits(graphs.run(ids, pos, caches, meta)[-1:])

        row = {"tokens": c, "eager": time_forward(eager), "piecewise": time_forward(piecewise)}
        row["padded_to"] = next(s for s in graphs.sizes if s >= c)
        print(json.dumps(row), flush=True)
        rows.append(row)
        if c == cases[0]:
            texts.append(
                f"==== {c} tokens, eager x3 (cProfile, tottime)\n" + cprofile_tottime(eager, rows=30)
            )
    info = {"shape": ns.shape, "num_layers": len(model.layers), "piecewise_sizes": graphs.sizes,
            "capture_s": capture_s, "device": torch.cuda.get_device_name()}  # fmt: skip
    (ns.out / f"eager_launch_host_{ns.shape}.json").write_text(json.dumps(info | {"rows": rows}, indent=1))
    (ns.out / f"eager_launch_host_{ns.shape}.txt").write_text("\n\n".join(texts))
    engine.shutdown()


if __name__ == "__main__":
    main()
