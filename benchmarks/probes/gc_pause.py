"""How long one full garbage collection pauses an engine process, with and without the
start-up heap frozen (`mnemosyne/gc_heap.py`). CPU, the embedded default model::

    python -m benchmarks.probes.gc_pause --out OUT.json

An engine (the default model on CPU) is built in this process, as the engine core builds its
own; then: the objects the collector tracks and the median of 3 full collections, before and
after `freeze_startup_heap`, and again after serving a few requests. First the same for
fresh processes that only import the API server or `bench serve` (both import torch).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from mnemosyne.engine.args import EngineArgs
from mnemosyne.engine.llm_engine import LLMEngine
from mnemosyne.gc_heap import freeze_startup_heap
from mnemosyne.sampling_params import SamplingParams


def full_collection_ms(repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        gc.collect(2)
        times.append(time.perf_counter() - t0)
    return round(1e3 * statistics.median(times), 3)


def state(label: str) -> dict:
    return {"when": label, "tracked_objects": len(gc.get_objects()), "full_collection_ms": full_collection_ms()}


IMPORTS_ONLY = """
import gc, json, time
import {module}
t0 = time.perf_counter(); gc.collect(2); t1 = time.perf_counter(); gc.collect(2); t2 = time.perf_counter()
print(json.dumps({{"when": "{what} imports, a fresh process", "tracked_objects": len(gc.get_objects()),
                  "full_collection_ms": round(1e3 * min(t1 - t0, t2 - t1), 3)}}))
"""
IMPORTS = {"API server": "mnemosyne.server.launch", "bench serve": "mnemosyne.bench.serve"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    rows = []
    for what, module in IMPORTS.items():
        code = IMPORTS_ONLY.format(module=module, what=what)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    engine = LLMEngine.from_args(EngineArgs(device="cpu"))
    rows.append(state("engine built"))
    rows.append({"when": "frozen", "num_frozen": freeze_startup_heap()} | state("frozen"))
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    for i in range(8):
        engine.add_request([1 + (i * 7 + j) % 1000 for j in range(64)], params)
    while engine.has_unfinished_requests():
        engine.step()
    rows.append(state("after 8 requests"))
    result = {
        "probe": "gc_pause", "command": "python -m benchmarks.probes.gc_pause --out " + str(args.out),
        "device": f"CPU ({platform.machine()}, {torch.get_num_threads()} threads), Python {platform.python_version()}",
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "rows": rows,
    }  # fmt: skip
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(rows))
    engine.shutdown()


if __name__ == "__main__":
    main()
