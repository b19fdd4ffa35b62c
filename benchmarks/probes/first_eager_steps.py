"""An eager prefill step the first time a step of its size runs, and the second time (1x GPU).

Steps of more tokens than the piecewise graphs hold (1024) run eagerly on memory from torch's
caching allocator. The probe builds the engine as the mixed scenario does (random weights of
--shape, bfloat16, a step budget of 8448 tokens, the KV cache from free memory), then
prefills one prompt at a time (max_tokens=1: one step, the whole prompt in one chunk), the
--sizes in their order, twice over. Per step: its time (submit to result, from an idle
device, `LLMEngine.take_step_stats`) and what the allocator did meanwhile
(`torch.cuda.memory_stats`: device allocations, and retries, each of which first frees the
cache and synchronizes the device).

    python -m benchmarks.probes.first_eager_steps --out OUT.json [--shape llama3.2-1b]
        [--sizes 1481,2656,3965,1738,8448,1206,4800]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import torch

from mnemosyne.bench.long_context.engine import random_prompt
from mnemosyne.bench.long_context.run import write_model_dir
from mnemosyne.engine.args import EngineArgs
from mnemosyne.engine.llm_engine import LLMEngine
from mnemosyne.sampling_params import SamplingParams

_ALLOCATOR_STATS = ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")


def allocator_stats() -> dict[str, int]:
    stats = torch.cuda.memory_stats() if torch.cuda.is_available() else {}
    return {k: int(stats.get(k, 0)) for k in _ALLOCATOR_STATS}


def prefill_once(engine: LLMEngine, num_tokens: int, seed: int) -> dict:
    vocab = engine.config.model.vocab_size
    prompt = random_prompt(num_tokens, seed=seed, max_id=vocab)
    engine.take_step_stats()
    before = allocator_stats()
    rid = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    finished = False
    while not finished:
        finished = any(o.finished for o in engine.step() if o.request_id == rid)
    after = allocator_stats()
    steps = engine.take_step_stats()
    return {
        "tokens": num_tokens,
        "step_ms": [round(1e3 * s.actual_s, 2) for s in steps],
        "predicted_ms": [round(1e3 * s.predicted_s, 2) for s in steps],
        "allocator": {k: after[k] - before[k] for k in _ALLOCATOR_STATS},
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shape", default="llama3.2-1b")
    ap.add_argument("--sizes", default="1481,2656,3965,1738,8448,1206,4800")
    ns = ap.parse_args(argv)
    sizes = [int(x) for x in ns.sizes.split(",")]
    model_dir = write_model_dir(ns.shape, Path(tempfile.mkdtemp()))
    engine = LLMEngine.from_args(
        EngineArgs(
            model=str(model_dir), load_format="dummy", dtype="bfloat16", max_num_batched_tokens=8192 + 256,
            enable_prefix_caching=False,
        )
    )  # fmt: skip
    rounds = []
    for r in range(2):
        rows = [prefill_once(engine, n, seed=100 * r + i) for i, n in enumerate(sizes)]
        for row in rows:
            print(json.dumps({"round": r, **row}), flush=True)
        rounds.append(rows)
    result = {
        "benchmark": "first_eager_steps",
        "command": "python -m benchmarks.probes.first_eager_steps " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "rounds": rounds,
    }
    ns.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
