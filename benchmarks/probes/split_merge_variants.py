"""The chunk kernels' split merge (`merge_attn.merge_splits`) with other (heads, splits,
warps) per program: one layer's chunk attention forward per variant, event-timed (median of
10, eager). One GPU::

    python -m benchmarks.probes.split_merge_variants --out OUT.jsonl

The engine's merge launches 2 heads x 8 splits with 2 warps, chosen from this sweep (H200,
2026-11-30: benchmarks/results/session10_h200x2_2026-11-30/). The probe makes the two chunk
kernels' modules call `merge_splits` with each variant's blocks.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

import mnemosyne.kernels.chunk_splitkv_attention as splitkv_module
import mnemosyne.kernels.chunk_tma_attention as tma_module
from benchmarks.probes.chunk_launch_kernels import HEADS_PER_KV, event_median_ms, launch, launch_splits
from mnemosyne.kernels.merge_attn import merge_splits
from mnemosyne.layers.attention.kernel_backend import KernelBackend

VARIANTS = ((16, 4, 4), (8, 4, 4), (4, 4, 4), (2, 4, 4), (8, 2, 4), (4, 8, 4), (1, 16, 4), (8, 4, 8), (2, 8, 2))
CASES = ([(64, 408064)], [(2340, 1024), (64, 408064)], [(2340, 1024)])


def variant_merge(block_h: int, chunk: int, num_warps: int) -> Callable[..., None]:
    """`merge_attn.merge_splits` with these blocks, for the chunk kernels to call."""
    return partial(merge_splits, block_h=block_h, chunk=chunk, num_warps=num_warps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    device = torch.device("cuda")
    with args.out.open("w") as f:
        for d in (64, 128):
            backend = KernelBackend(HEADS_PER_KV, d, torch.bfloat16, device)
            for chunks in CASES:
                forward, host = launch(backend, chunks, d, device)
                times = {}
                for block_h, chunk, num_warps in VARIANTS:
                    splitkv_module.merge_splits = tma_module.merge_splits = variant_merge(block_h, chunk, num_warps)
                    ms = event_median_ms(forward)
                    times[f"bh{block_h}_ch{chunk}_w{num_warps}"] = round(ms, 4)
                row = {"hd": d, "chunks": chunks, "splits": launch_splits(host), "forward_ms": times}
                print(json.dumps(row), file=f, flush=True)
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
