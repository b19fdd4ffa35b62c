"""Device time of each kernel of one layer's chunk attention (phase 1 and the split merge),
for uneven launches (a short prompt's long chunk beside a small chunk after a huge prefix)
and for each sequence alone. One GPU, random paged cache, the kernel backend's own plan::

    python -m benchmarks.probes.chunk_launch_kernels --head-dim 64 --out OUT.jsonl
    python -m benchmarks.probes.chunk_launch_kernels --head-dim 128 --cases "224:40960,32*1:1099" \
        --waves 2,4,8 --decode-budgets 1,8,33,66 --out OUT.jsonl

A case is sequences joined by '+', each 'c:prefix' or 'N*c:prefix' (N alike; c = 1 is a
decode). --waves runs each case at those chunk split targets (programs per SM, the
backend's `ChunkKernelConfig.waves`), --decode-budgets at those decode split budgets
(work items for the batch's decodes; 1 writes the output directly, no reduce).

Per case: the plan's split count and tiles, the median of 10 event-timed forwards (eager:
launch gaps included) and each kernel's device time per forward under torch.profiler.
Found with it (H200, 2026-11-30): the old merge took 0.52 ms of a 0.8-ms forward for a
2340-token prompt's 2 splits (benchmarks/results/session10_h200x2_2026-11-30/).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from mnemosyne.layers.attention.kernel_backend import KernelBackend
from mnemosyne.layers.attention.kernel_plan import ChunkKernelConfig, HostPlan
from mnemosyne.layers.attention.metadata import AttentionMetadata

BLOCK = 64
NUM_KV_HEADS, HEADS_PER_KV = 8, 4
CASES = {  # (chunk tokens, prefix tokens) per sequence of one launch
    64: "2340:1024+64:408064,64:408064,2340:1024,128:397664+1408:0,1024:320+32:350176,64:1048576,128:131072",
    128: "2048:1024+64:408064,1024:320+32:350176,128:131072,64:524288,128:524288,32:131072",
}


def parse_case(case: str) -> list[tuple[int, int]]:
    """'N*c:prefix+c:prefix' -> [(c, prefix)] * N + [(c, prefix)]."""
    chunks = []
    for part in case.split("+"):
        count, _, seq = part.rpartition("*")
        c, prefix = map(int, seq.split(":"))
        chunks += [(c, prefix)] * int(count or 1)
    return chunks


def random_launch(
    chunks: list[tuple[int, int]], head_dim: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """(query, k_cache, v_cache, metadata) of one launch: each sequence (chunk tokens, prefix
    tokens) in its own run of consecutive blocks of a random bf16 cache."""
    num_blocks = sum(-(-(c + p) // BLOCK) for c, p in chunks)
    k_cache = torch.randn(num_blocks, BLOCK, NUM_KV_HEADS, head_dim, dtype=torch.bfloat16, device=device)
    v_cache = torch.randn_like(k_cache)
    tables, b0 = [], 0
    for c, p in chunks:
        n = -(-(c + p) // BLOCK)
        tables.append(list(range(b0, b0 + n)))
        b0 += n
    num_tokens = sum(c for c, _ in chunks)
    meta = AttentionMetadata.build(
        [c for c, _ in chunks], [p for _, p in chunks], [0] * len(chunks), [c + p for c, p in chunks],
        tables, [-1] * num_tokens, device,
    )  # fmt: skip
    query = torch.randn(
        num_tokens, NUM_KV_HEADS * HEADS_PER_KV, head_dim, dtype=torch.bfloat16, device=device
    )
    return query, k_cache, v_cache, meta


def launch(
    backend: KernelBackend, chunks: list[tuple[int, int]], head_dim: int, device: torch.device
) -> tuple[Callable[[], None], HostPlan]:
    """(one forward of the launch on the backend's own plan, that host plan)."""
    query, k_cache, v_cache, meta = random_launch(chunks, head_dim, device)
    host = backend.host_plan(meta, NUM_KV_HEADS, None, BLOCK)
    meta.backend_plan = backend.device_plan(host, NUM_KV_HEADS)
    forward = partial(backend.forward, query, k_cache, v_cache, meta, head_dim**-0.5, None)
    return forward, host


def launch_splits(host: HostPlan) -> list[int] | int:
    """The split count of each Triton chunk launch of the plan (`tile_groups.py`), else its one."""
    return [g.splits for g in host.groups] or host.chunk_splits


def event_median_ms(fn: Callable[[], object], iters: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--head-dim", type=int, default=64, choices=sorted(CASES))
    ap.add_argument("--cases", default=None, help="c:prefix+c:prefix,... (default: the head dim's list)")
    ap.add_argument("--waves", default="", help="chunk split targets to sweep (default: the backend's)")
    ap.add_argument(
        "--decode-budgets", default="", help="decode split budgets to sweep (default: the backend's)"
    )
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    device, d = torch.device("cuda"), args.head_dim
    waves = [int(w) for w in args.waves.split(",") if w] or [None]
    budgets = [int(b) for b in args.decode_budgets.split(",") if b] or [None]
    with args.out.open("w") as f:
        for case, w, budget in itertools.product((args.cases or CASES[d]).split(","), waves, budgets):
            backend = KernelBackend(
                HEADS_PER_KV, d, torch.bfloat16, device, chunk_config=ChunkKernelConfig(waves=w)
            )
            if budget is not None:
                backend.decode_split_budget = lambda num_kv_heads, b=budget: b  # the sweep's budget
            chunks = parse_case(case)
            forward, host = launch(backend, chunks, d, device)
            ms = event_median_ms(forward)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    forward()
                torch.cuda.synchronize()
            kernels = {
                e.key: round(e.self_device_time_total / 5 / 1e3, 4) for e in prof.key_averages() if e.self_device_time_total
            }  # fmt: skip
            row = {
                "head_dim": d, "case": case, "waves": w, "decode_budget": budget, "splits": launch_splits(host),
                "tiles": len(host.tile_seq),
                "dense": len(host.dense), "event_ms_median": round(ms, 4), "kernels_ms_per_forward": kernels,
                "device": torch.cuda.get_device_name(),
            }  # fmt: skip
            print(json.dumps(row), file=f, flush=True)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
