"""One layer's chunk attention of an uneven launch: a short prompt's long first chunk beside
a long prompt's small chunk after a huge prefix (one GPU, random cache, the kernel backend's
own plan). The split count of the launch once came from its tile count alone, so the long
prefix's few tiles got 2 splits and walked it with a handful of programs (1B serving trace,
2026-11-30: such steps took 3x their prediction). Times the plan with the balanced split
count (`choose_chunk_splits(tile_keys=...)`) in one launch against the same launch forced to
the old count, and, where the backend plans them (`tile_groups.py`), two launches:

    python -m benchmarks.probes.uneven_chunk_splits --out OUT.json [--head-dim 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from benchmarks.probes.chunk_launch_kernels import BLOCK, HEADS_PER_KV, NUM_KV_HEADS, random_launch
from mnemosyne.layers.attention.kernel_backend import KernelBackend
from mnemosyne.layers.attention.metadata import AttentionMetadata


def _median_ms(
    backend: KernelBackend, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    meta: AttentionMetadata, iters: int,
) -> float:  # fmt: skip
    """Median ms of one forward on meta's plan (one warm-up call first)."""
    times = []
    for _ in range(iters + 1):
        if query.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        backend.forward(query, k_cache, v_cache, meta, query.shape[-1] ** -0.5, None)
        if query.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--cases", default="2340:1024+64:408064,2623:320+64:350176,128:397664+1408:0")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run under TRITON_INTERPRET=1")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    num_kv_heads, group, d = NUM_KV_HEADS, HEADS_PER_KV, args.head_dim
    dev = torch.device(args.device)
    backend = KernelBackend(group, d, torch.bfloat16, dev)
    rows = []
    for case in args.cases.split(","):
        chunks = [tuple(map(int, part.split(":"))) for part in case.split("+")]  # (c, prefix)
        query, k_cache, v_cache, meta = random_launch(chunks, d, dev)
        host = backend.host_plan(meta, num_kv_heads, None, BLOCK)
        # the count from the tile count alone: the backend's rule without tile_keys
        old = backend.chunk_splits(len(host.tile_seq), num_kv_heads, max(c + p for c, p in chunks), host.page_tiles)
        row = {"chunks": chunks, "num_tiles": len(host.tile_seq), "num_dense": len(host.dense)}
        groups, host.groups = host.groups, []
        for name, splits in (("balanced", host.chunk_splits), ("tile_count", old)):
            host.chunk_splits = splits  # one launch over every tile
            meta.backend_plan = backend.device_plan(host, num_kv_heads)
            row[name] = {"splits": splits, "ms": _median_ms(backend, query, k_cache, v_cache, meta, 10)}
        if groups:  # the long prefix in a launch of its own (layers/attention/tile_groups.py)
            host.groups = groups
            meta.backend_plan = backend.device_plan(host, num_kv_heads)
            row["two_launches"] = {
                "splits": [g.splits for g in groups], "ms": _median_ms(backend, query, k_cache, v_cache, meta, 10)
            }
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "command": f"python -m benchmarks.probes.uneven_chunk_splits --head-dim {d} --cases {args.cases}",
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "date": datetime.now(UTC).date().isoformat(),
        "heads": {"kv": num_kv_heads, "per_kv": group, "head_dim": d}, "rows": rows,
    }  # fmt: skip
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
