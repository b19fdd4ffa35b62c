"""Why CPU engines default to fixed chunks + FCFS: the same small batch under each policy pair.

    python -m benchmarks.cpu_default_policies --out OUT.json [--repeats 3]

The embedded default model on CPU, 8 prompts of ~60-260 tokens, 32 greedy tokens each, after
one warm-up request; the wall time of `LLM.generate` per policy pair (best of --repeats). On
CPU even a decode step of this model is longer than the 30 ms TBT target, so adaptive chunks
can only shrink prefills; the figures say by how much that costs.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

from mnemosyne import LLM, SamplingParams

PAIRS = (("fixed", "fcfs"), ("adaptive", "lars"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ns = ap.parse_args()
    prompts = [("Tell me a long story about the sea and the sky " * (5 + 3 * i)) for i in range(8)]
    params = SamplingParams(max_tokens=32, temperature=0)
    runs = []
    for chunk_policy, scheduling_policy in PAIRS:
        with LLM(device="cpu", chunk_policy=chunk_policy, scheduling_policy=scheduling_policy) as llm:
            llm.generate(prompts[:1], params)
            times = []
            for _ in range(ns.repeats):
                t0 = time.perf_counter()
                llm.generate(prompts, params)
                times.append(time.perf_counter() - t0)
        runs.append({"chunk_policy": chunk_policy, "scheduling_policy": scheduling_policy, "best_s": min(times), "times_s": times})
        print(json.dumps(runs[-1]))
    result = {
        "benchmark": "cpu_default_policies",
        "command": f"python -m benchmarks.cpu_default_policies --out {ns.out} --repeats {ns.repeats}",
        "device": f"CPU ({platform.processor() or platform.machine()}), the embedded default model",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "runs": runs,
    }
    ns.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
