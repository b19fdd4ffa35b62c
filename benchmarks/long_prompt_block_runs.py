"""SIMULATED (CPU, the engine's own scheduler and KV manager in virtual time): how the mixed
scenario's long prompt's KV blocks lie in the pool while its 32 decodes run, i.e. how much of
its prefix the cuDNN chunk path reads as a strided view (the leading run of consecutive
blocks) and how much it gathers block by block (`kernels/cudnn_prefill.py`). The profiler's
synthetic sequences are one run (`mnemosyne profile --block-layout contiguous`).

    python -m benchmarks.long_prompt_block_runs --profile P [--configs fixed512,adaptive_lars] [--steps 200,400]
        [--short-prompt-spread 2] [--arrival-every 10]

`--short-prompt-spread S` desynchronizes the decodes: short request i gets a 1024 + i*S token
prompt, so they cross block boundaries (and allocate) at different steps, as in real serving.
`--arrival-every K`: while the long prompt prefills, a new request (1024-token prompt, 64
output tokens) arrives every K steps, so new pieces are placed while the prompt grows and
finished ones leave holes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks.mixed_long_short import CONFIGS
from mnemosyne.bench.long_context.run import write_model_dir
from mnemosyne.engine.args import EngineArgs
from mnemosyne.layers.attention.metadata import leading_run
from mnemosyne.simulator.engine import SimulatedEngine
from mnemosyne.simulator.setup import device_spec, latency_model_for, simulated_engine_config


def block_runs(block_ids: list[int]) -> dict:
    breaks = sum(1 for a, b in zip(block_ids, block_ids[1:], strict=False) if b != a + 1)
    return {"blocks": len(block_ids), "leading_run_blocks": leading_run(block_ids)[1], "breaks": breaks}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", required=True)
    ap.add_argument("--configs", default="fixed512,fixed2048,adaptive_lars")
    ap.add_argument("--steps", default="50,200,400", help="steps after the long prompt's arrival")
    ap.add_argument(
        "--short-prompt-spread", type=int, default=0,
        help="short request i has a 1024 + i*S token prompt (0: all 1024, synchronized decodes)",
    )  # fmt: skip
    ap.add_argument("--arrival-every", type=int, default=0, help="steps between late arrivals (0: none)")
    ns = ap.parse_args(argv)
    checkpoints = sorted(int(s) for s in ns.steps.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model_dir("llama3-8b", Path(tmp))
        for name in ns.configs.split(","):
            cfg = CONFIGS[name]
            args = EngineArgs(
                model=str(model_dir), max_num_batched_tokens=8192 + 256, max_num_seqs=256,
                enable_prefix_caching=False, chunk_policy=cfg["chunk_policy"], chunk_size=cfg["chunk_size"],
                scheduling_policy=cfg["scheduling_policy"], tbt_slo_ms=30.0, latency_profile=ns.profile,
            )  # fmt: skip
            spec = device_spec("h200")
            config = simulated_engine_config(model_dir, args, spec)
            sim = SimulatedEngine(config, *latency_model_for(config, spec))
            shorts = [f"short-{i}" for i in range(32)]
            for i, rid in enumerate(shorts):
                sim.add_request(rid, 1024 + i * ns.short_prompt_spread, 8192)
            while any(len(sim.requests[r].token_times_s) < 2 for r in shorts):
                sim.step()
            sim.add_request("long", 262144, 1)
            done = 0
            for n in checkpoints:
                while done < n and not sim.requests["long"].token_times_s:
                    if ns.arrival_every and done % ns.arrival_every == 0:
                        sim.add_request(f"late-{done}", 1024, 64)
                    sim.step()
                    done += 1
                if not sim.kv_manager.has_request("long"):
                    break
                ids = [b for p in sim.kv_manager.pieces("long") for b in p.block_ids]
                row = {
                    "config": name,
                    "short_prompt_spread": ns.short_prompt_spread,
                    "arrival_every": ns.arrival_every,
                    "steps": done,
                    "block_size": config.cache.block_size,
                    **block_runs(ids),
                }
                print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
