"""CPU host cost of `BlockPool.allocate` / `free` in the long-prompt-beside-decodes pattern.

A pool of `--num-blocks` blocks (70K: an 8B model's KV on one H200 at 16-token blocks; 15K at
64-token blocks); 32 short requests of 17 blocks, then a long prompt growing by
`--chunk-blocks` per step while each short decodes (a 0-block call inside its last block,
a 1-block call every 64 steps, staggered), for `--steps` steps; every `--churn` steps one short finishes and a new one takes its place (so the free
space is not one clean range). Then everything is freed. Prints mean microseconds per call
(and per block for the frees) as one JSON line. Timings are host (Python) cost only.

    python -m benchmarks.block_pool_host_cost [--num-blocks 70000] [--steps 2000]
"""

from __future__ import annotations

import argparse
import inspect
import json
import time
from collections import defaultdict

from mnemosyne.kv_cache.block_pool import BlockPool


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-blocks", type=int, default=70000)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--chunk-blocks", type=int, default=8)
    ap.add_argument("--churn", type=int, default=16)
    ns = ap.parse_args(argv)
    pool = BlockPool(ns.num_blocks)
    extends = "after" in inspect.signature(pool.allocate).parameters  # older pools lack it
    seconds: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)

    def alloc(kind: str, n: int, owned: list[int]) -> None:
        t0 = time.perf_counter()
        got = pool.allocate(n, after=owned[-1]) if extends and owned else pool.allocate(n)
        seconds[kind] += time.perf_counter() - t0
        calls[kind] += 1
        owned.extend(got)

    def release(kind: str, owned: list[int]) -> None:
        t0 = time.perf_counter()
        pool.free(reversed(owned))
        seconds[kind] += time.perf_counter() - t0
        calls[kind] += 1
        calls[kind + "_blocks"] += len(owned)

    shorts: list[list[int]] = []
    for _ in range(32):
        shorts.append([])
        alloc("allocate_new", 17, shorts[-1])
    long_blocks: list[int] = []
    for step in range(ns.steps):
        alloc("allocate_extend_chunk", ns.chunk_blocks, long_blocks)
        for i, s in enumerate(shorts):  # the manager calls the pool every decode step
            if (step + 2 * i) % 64 == 0:
                alloc("allocate_extend_decode", 1, s)
            else:
                alloc("allocate_decode_inside_block", 0, s)
        if step % ns.churn == 0:
            i = step // ns.churn % len(shorts)
            release("free_short", shorts[i])
            shorts[i] = []
            alloc("allocate_new", 17, shorts[i])
    release("free_long", long_blocks)
    for s in shorts:
        release("free_short", s)
    pool.check_integrity()
    row: dict[str, object] = {"num_blocks": ns.num_blocks, "steps": ns.steps, "extends_in_place": extends}
    for kind in sorted(seconds):
        row[f"{kind}_us_per_call"] = round(seconds[kind] / calls[kind] * 1e6, 2)
        if kind.startswith("free"):
            row[f"{kind}_us_per_block"] = round(seconds[kind] / calls[kind + "_blocks"] * 1e6, 3)
    breaks = sum(1 for a, b in zip(long_blocks, long_blocks[1:], strict=False) if b != a + 1)
    row["long_blocks"], row["long_breaks"] = len(long_blocks), breaks
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
