"""The chunk kernels' split merge (`merge_attn.merge_splits`) with other (heads, splits,
warps) per program: one layer's chunk attention forward per variant, event-timed (median of
10, eager). One GPU::

    python -m benchmarks.probes.split_merge_variants --out OUT.jsonl

The engine's merge launches 2 heads x 8 splits with 2 warps, chosen from this sweep (H200,
2026-11-30: benchmarks/results/session10_h200x2_2026-11-30/). The probe swaps the
launcher in the two chunk kernels' modules; the kernel itself is the engine's.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch

import mnemosyne.kernels.chunk_splitkv_attention as splitkv_module
import mnemosyne.kernels.chunk_tma_attention as tma_module
from benchmarks.probes.chunk_launch_kernels import HEADS_PER_KV, event_median_ms, launch
from mnemosyne.kernels.host_math import cdiv, next_power_of_2
from mnemosyne.kernels.merge_attn import _split_rows_merge_kernel
from mnemosyne.layers.attention.kernel_backend import KernelBackend

VARIANTS = ((16, 4, 4), (8, 4, 4), (4, 4, 4), (2, 4, 4), (8, 2, 4), (4, 8, 4), (1, 16, 4), (8, 4, 8), (2, 8, 2))
CASES = ([(64, 408064)], [(2340, 1024), (64, 408064)], [(2340, 1024)])


def variant_merge(block_h: int, chunk: int, num_warps: int) -> Callable[..., None]:
    """A stand-in for `merge_attn.merge_splits` launching its kernel with these blocks."""

    def merge(
        o_ws: torch.Tensor, l_ws: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, merge_rows: torch.Tensor,
        num_splits: int,
    ) -> None:  # fmt: skip
        num_heads, head_dim = out.shape[1], out.shape[2]
        _split_rows_merge_kernel[(merge_rows.shape[0], cdiv(num_heads, block_h))](
            o_ws, l_ws, out, lse, merge_rows, num_heads, num_splits,
            o_ws.stride(0), o_ws.stride(1), o_ws.stride(2), l_ws.stride(0), l_ws.stride(1),
            out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
            HEAD_DIM=head_dim, BLOCK_D=max(16, next_power_of_2(head_dim)), BLOCK_H=block_h, CHUNK=chunk,
            INTERPRET=False, num_warps=num_warps,
        )  # fmt: skip

    return merge


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
                row = {"hd": d, "chunks": chunks, "splits": host.chunk_splits, "forward_ms": times}
                print(json.dumps(row), file=f, flush=True)
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
