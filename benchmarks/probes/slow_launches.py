"""Which step launches hold the host: the mixed scenario in small (32 requests decoding, then
one long prompt), with every `Worker.execute_async` timed on the host and profiled.

For each launch: its host seconds (until it returns; the device runs on) and what the plan
held (query tokens, decodes, whether a chunk samples, new requests). Launches over
`--slow-ms` keep their cProfile table (tottime), so a stall shows where it is spent. Built
for the ~40-ms launch of the step that samples the long prompt's first token in the 8B
mixed scenario (benchmarks/results/README.md, "Eleventh session"); cProfile slows every
launch, so compare launches with each other, not with step times.

    python -m benchmarks.probes.slow_launches --shape llama3-8b --long-len 32768 --out DIR
    python -m benchmarks.probes.slow_launches --model-dir DIR --device cpu --num-short 4 --long-len 300 --out DIR  # smoke
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import tempfile
import time
from pathlib import Path

from mnemosyne import SamplingParams
from mnemosyne.bench.long_context.engine import random_prompt
from mnemosyne.bench.long_context.run import SHAPES, write_model_dir
from mnemosyne.engine.args import EngineArgs
from mnemosyne.engine.llm_engine import LLMEngine
from mnemosyne.wire.plan import StepPlan


def plan_summary(plan: StepPlan) -> dict:
    return {
        "step_id": plan.step_id,
        "num_tokens": plan.num_batched_tokens,
        "num_decodes": sum(1 for c in plan.chunks if c.num_tokens == 1),
        "chunk_tokens": [c.num_tokens for c in plan.chunks if c.num_tokens > 1],
        "samples_a_chunk": any(c.sample and c.num_tokens > 1 for c in plan.chunks),
        "num_new_requests": len(plan.new_requests),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument(
        "--model-dir", type=Path, default=None, help="this model instead of --shape (smoke tests)"
    )
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--num-short", type=int, default=32)
    ap.add_argument("--short-len", type=int, default=1024)
    ap.add_argument("--long-len", type=int, default=32768)
    ap.add_argument("--short-max-tokens", type=int, default=4096, help="more than the long prefill's steps")
    ap.add_argument("--slow-ms", type=float, default=10.0)
    ap.add_argument("--out", type=Path, required=True)
    ns = ap.parse_args()
    model_dir = ns.model_dir or write_model_dir(ns.shape, Path(tempfile.mkdtemp()))
    load = "safetensors" if ns.model_dir else "dummy"
    engine = LLMEngine.from_args(EngineArgs(model=str(model_dir), load_format=load, dtype=ns.dtype, device=ns.device,
                                            max_num_batched_tokens=8448, max_num_seqs=256, enable_prefix_caching=False))  # fmt: skip
    worker = engine.executor.worker
    launch = worker.execute_async
    launches: list[dict] = []
    recording = False

    def timed_launch(plan: StepPlan):  # -> PendingResult | None
        if not recording:
            return launch(plan)
        profile = cProfile.Profile()
        t0 = time.perf_counter()
        profile.enable()
        pending = launch(plan)
        profile.disable()
        row = plan_summary(plan) | {"host_ms": (time.perf_counter() - t0) * 1e3}
        if row["host_ms"] > ns.slow_ms:
            text = io.StringIO()
            pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(20)
            row["profile"] = text.getvalue()
        launches.append(row)
        return pending

    worker.execute_async = timed_launch
    vocab = engine.config.model.vocab_size
    short = SamplingParams(temperature=0, max_tokens=ns.short_max_tokens, ignore_eos=True)
    shorts = [
        engine.add_request(random_prompt(ns.short_len, 100 + i, vocab), short) for i in range(ns.num_short)
    ]
    seen: dict[str, int] = {}
    while min(seen.get(r, 0) for r in shorts) < 2:
        for out in engine.step():
            seen[out.request_id] = len(out.token_ids)
    recording = True
    long_id = engine.add_request(
        random_prompt(ns.long_len, 7, vocab), SamplingParams(temperature=0, max_tokens=4)
    )
    while not any(out.request_id == long_id and out.token_ids for out in engine.step()):
        pass
    for _ in range(8):  # a few steps after the first token
        engine.step()
    recording = False
    engine.shutdown()
    host = [r["host_ms"] for r in launches]
    slow = [r for r in launches if r["host_ms"] > ns.slow_ms]
    result = {
        "probe": "slow_launches", "args": {k: str(v) for k, v in vars(ns).items()},
        "num_launches": len(launches), "host_ms_median": statistics.median(host), "host_ms_max": max(host),
        "num_slow": len(slow), "slow": slow,
        "launches": [{k: v for k, v in r.items() if k != "profile"} for r in launches],
    }  # fmt: skip
    ns.out.mkdir(parents=True, exist_ok=True)
    path = ns.out / "slow_launches.json"
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("num_launches", "host_ms_median", "host_ms_max", "num_slow")}))
    for r in slow:
        print(json.dumps({k: v for k, v in r.items() if k != "profile"}))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
