"""Where a short chunk step's host time goes (one GPU, dummy weights): for each (chunk,
prefix), the step's median time eager and through the piecewise graphs, on the page-aligned
chunk kernel and on the per-key one (the same engine, the backend told to plan without
pages), plus the host ops that cost the most (torch.profiler, self CPU time) and the Python
functions (cProfile, cumulative) of a few eager steps.

    python -m benchmarks.probes.chunk_step_host --shape llama3-8b --cases 32:131072,128:131072 --out DIR
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from benchmarks.probes.host_profile import cprofile_tottime
from mnemosyne import SamplingParams
from mnemosyne.bench.long_context.engine import _median_s, synthetic_meta
from mnemosyne.bench.long_context.run import write_model_dir
from mnemosyne.engine.args import EngineArgs
from mnemosyne.engine.llm_engine import LLMEngine
from mnemosyne.layers.attention.kernel_backend import KernelBackend


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--cases", default="32:131072,128:131072", help="chunk:prefix,...")
    p.add_argument("--kv-fraction", type=float, default=0.5)
    p.add_argument("--max-pos", type=int, default=None, help="the model's max_position_embeddings")
    p.add_argument("--warm-up", action="store_true", help="run one request through the engine first")
    p.add_argument("--out", type=Path, required=True)
    ns = p.parse_args()
    model_dir = write_model_dir(ns.shape, Path(tempfile.mkdtemp()), *([ns.max_pos] if ns.max_pos else []))
    args = EngineArgs(model=str(model_dir), load_format="dummy", dtype="bfloat16", chunk_size=2048,
                      max_num_batched_tokens=2048, max_num_seqs=40, kv_cache_memory_fraction=ns.kv_fraction)  # fmt: skip
    engine = LLMEngine.from_args(args)
    if ns.warm_up:
        engine.add_request(
            list(range(1000, 4000)), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        )
        while engine.has_unfinished_requests():
            engine.step()
    worker = engine.executor.worker
    model, caches, bs = worker.model, worker.kv_caches, engine.config.cache.block_size
    backend = next(
        m.backend for m in model.modules() if isinstance(getattr(m, "backend", None), KernelBackend)
    )
    page_tiles_of = backend.uses_page_tiles
    ns.out.mkdir(parents=True, exist_ok=True)
    rows, texts = [], []
    for case in ns.cases.split(","):
        c, prefix = map(int, case.split(":"))
        meta = synthetic_meta(c, prefix, bs)
        pos = torch.arange(prefix, prefix + c, device="cuda")
        ids = torch.ones(c, dtype=torch.long, device="cuda")
        for kernel in ("page_tiles", "per_key"):
            backend.uses_page_tiles = page_tiles_of if kernel == "page_tiles" else (lambda block_size: False)

            def eager(meta=meta, ids=ids, pos=pos) -> None:
                meta.backend_plan = None
                model.compute_logits(model(ids, pos, caches, meta)[-1:])

            def piecewise(meta=meta, ids=ids, pos=pos) -> None:
                meta.backend_plan = None
                model.compute_logits(worker.piecewise.run(ids, pos, caches, meta)[-1:])

            def plan_only(meta=meta) -> None:
                meta.backend_plan = None
                backend.plan(meta, engine.config.model.num_kv_heads, None, bs)

            with torch.inference_mode():
                row = {"chunk": c, "prefix": prefix, "kernel": kernel,
                       "eager_ms": _median_s(eager, 5) * 1e3, "piecewise_ms": _median_s(piecewise, 5) * 1e3}  # fmt: skip
                meta.backend_plan = None
                eager()
                row["splits"] = meta.backend_plan.chunk_splits
                row["plan_ms"] = _median_s(plan_only, 5) * 1e3
                print(json.dumps(row), flush=True)
                rows.append(row)
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                        torch.profiler.ProfilerActivity.CUDA]) as prof:  # fmt: skip
                    for _ in range(3):
                        eager()
                    torch.cuda.synchronize()
                head = f"==== chunk {c} after {prefix}, {kernel}, eager x3"
                texts.append(
                    head
                    + " (self CPU)\n"
                    + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18)
                )
                texts.append(
                    head + " (CUDA)\n" + prof.key_averages().table(sort_by="cuda_time_total", row_limit=10)
                )
                texts.append(head + " (cProfile, tottime)\n" + cprofile_tottime(eager))
    backend.uses_page_tiles = page_tiles_of
    info = {"shape": ns.shape, "block_size": bs, "kv_fraction": ns.kv_fraction, "max_pos": ns.max_pos,
            "warm_up": ns.warm_up, "max_model_len": engine.config.scheduler.max_model_len}  # fmt: skip
    (ns.out / "chunk_step_host.json").write_text(json.dumps(info | {"rows": rows}, indent=1))
    (ns.out / "chunk_step_host.txt").write_text("\n\n".join(texts))
    engine.shutdown()


if __name__ == "__main__":
    main()
