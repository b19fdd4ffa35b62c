"""Where a mixed step's time goes (one GPU, dummy weights): per-step wall time split into
schedule + plan, execute (synchronized) and output processing, by step kind, plus the
top CUDA kernels of a few mixed steps from torch.profiler.

    python -m benchmarks.probes.step_profile --out DIR
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mnemosyne import SamplingParams
from mnemosyne.bench.long_context.run import write_model_dir
from mnemosyne.engine.args import EngineArgs
from mnemosyne.engine.llm_engine import LLMEngine


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--out", type=Path, required=True)
    ns = p.parse_args()
    model_dir = write_model_dir(ns.shape, Path(tempfile.mkdtemp()))
    args = EngineArgs(model=str(model_dir), load_format="dummy", max_num_batched_tokens=1024, chunk_size=512,
                      max_model_len=131072)  # fmt: skip
    engine = LLMEngine.from_args(args)
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)

    def add(n: int) -> None:
        for _ in range(n):
            engine.add_request(torch.randint(1000, 128000, (1024,), generator=gen).tolist(), params)

    add(4)
    while engine.has_unfinished_requests():
        engine.step()  # warm-up
    add(ns.num_requests)
    rows = []
    ex, sched_build = engine.executor, engine.scheduler.schedule
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        sched = sched_build()
        plan = engine.planner.build(sched)
        t1 = time.perf_counter()
        ex.submit(plan)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        engine._process(sched, ex.get_result())
        t3 = time.perf_counter()
        num_prefill = sum(c.num_tokens for c in sched.chunks if c.num_tokens > 1)
        num_decode = sum(1 for c in sched.chunks if c.num_tokens == 1)
        rows.append({"prefill_tokens": num_prefill, "decodes": num_decode, "plan_ms": (t1 - t0) * 1e3,
                     "execute_ms": (t2 - t1) * 1e3, "process_ms": (t3 - t2) * 1e3})  # fmt: skip
    kinds: dict[str, list[dict]] = {}
    for r in rows:
        kind = (
            "mixed"
            if r["prefill_tokens"] and r["decodes"]
            else ("prefill" if r["prefill_tokens"] else "decode")
        )
        kinds.setdefault(kind, []).append(r)
    summary = {
        k: {"steps": len(v), **{f"median_{m}": statistics.median(r[m] for r in v)
                                for m in ("prefill_tokens", "decodes", "plan_ms", "execute_ms", "process_ms")}}
        for k, v in kinds.items()
    }  # fmt: skip
    print(json.dumps(summary, indent=1))

    # Kernels of a few mixed steps (two 512-token chunks + decodes).
    add(16)
    for _ in range(3):
        engine.step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:  # fmt: skip
        for _ in range(4):
            engine.step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    print(table)
    cpu_table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=15)
    print(cpu_table)
    ns.out.mkdir(parents=True, exist_ok=True)
    (ns.out / "step_profile.json").write_text(json.dumps({"summary": summary, "steps": rows}, indent=1))
    (ns.out / "step_profile_kernels.txt").write_text(table + "\n" + cpu_table)
    engine.shutdown()


if __name__ == "__main__":
    main()
