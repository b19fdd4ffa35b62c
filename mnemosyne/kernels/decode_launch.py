"""Launch options of the split-KV decode kernel's phase 1 (`decode_attention.py`) by input,
H200-tuned, and whether its K/V tiles can be TMA boxes of a cache."""

from __future__ import annotations

from typing import NamedTuple

import torch

from mnemosyne.kernels.chunk_tma_attention import tma_supported
from mnemosyne.kernels.host_math import CONFINED_BOX_KEYS, confined_decode_boxes


class DecodeLaunch(NamedTuple):
    """Launch options of phase 1."""

    block_n: int
    num_warps: int
    num_stages: int
    use_tma: bool = False  # K/V tiles as TMA boxes (one page run each; decode_attention.py)


# Launch options of phase 1 by input, H200-tuned:
# - 16-bit, head dim > 64: within 2% of the best of 96 configurations for 1x128K, 1x1M and
#   8x128K keys, 32/8 heads (benchmarks/results/probes/decode_tuning_h200_2026-11-21.json;
#   the waves are `decode_items.DEFAULT_WAVES`).
# - 16-bit, head dim <= 64: 128-key tiles of 4 warps (2 stages: 64 KB of shared memory; 3
#   measured the same). 1x1M keys, 32/8 heads of 64 (Llama-3.2-1B), in CUDA graphs: 576 ->
#   514 us a layer against 64-key tiles (bytes floor 511 us); 1M + 16x1K keys 643 -> 579 us
#   (benchmarks/results/session17_h200x2_2026-11-30/c/).
# - fp32: 64-key tiles (register pressure), 8 warps.
# - 16-bit, head dim > 64, on a few SMs (the steps' green context beside a prefill lane chunk,
#   `KernelPlan.decode_confined`): there each SM must move several times its whole-GPU share
#   of the bandwidth, and programs of one warp loading 64-key TMA boxes do: 32 decodes of 3K
#   keys, 8B heads, 529 -> 346 us a layer on 16 SMs (47.6 -> 72.7 GB/s per SM), 375 -> 260
#   on 24 (benchmarks/results/session29_h200_2026-12-03/d/); pointer gathers peak at 47 GB/s
#   per SM over 45 (block_n, warps, stages) (`b/`); a plain read of the same pages reaches
#   100-119 GB/s per SM (`a/`), the chunk kernel's page boxes at one warp 83 (`b/`, `d/`).
#   Masking only a work item's first and last tiles is what makes one warp pay: masked
#   throughout, 40 GB/s per SM (`c/`). Without TMA boxes (pages not a multiple of 64 slots,
#   before sm_90): 64-key tiles of 4 warps, 3 stages (session26_h200_2026-12-02/d/).
LAUNCH_16BIT = DecodeLaunch(128, 8, 2)
LAUNCH_16BIT_CONFINED = DecodeLaunch(CONFINED_BOX_KEYS, 1, 3, use_tma=True)
LAUNCH_16BIT_CONFINED_POINTERS = DecodeLaunch(64, 4, 3)
LAUNCH_16BIT_SMALL_HEAD = DecodeLaunch(128, 4, 2)
LAUNCH_FP32 = DecodeLaunch(64, 8, 2)


def launch_options(
    head_dim: int,
    dtype: torch.dtype,
    confined: bool = False,
    block_size: int | None = None,
    device: torch.device | None = None,
) -> DecodeLaunch:
    """Launch options of phase 1 for these inputs (the constants above); `confined`: the
    kernel runs on a few of the device's SMs, with TMA boxes where the cache's pages
    (`block_size`) and the `device` allow them."""
    if dtype == torch.float32:
        return LAUNCH_FP32
    if head_dim <= 64:
        return LAUNCH_16BIT_SMALL_HEAD
    if not confined:
        return LAUNCH_16BIT
    if (
        block_size is not None
        and device is not None
        and confined_decode_boxes(head_dim, dtype.itemsize, block_size)
        and tma_supported(head_dim, device)
    ):
        return LAUNCH_16BIT_CONFINED
    return LAUNCH_16BIT_CONFINED_POINTERS


def fits_boxes(block_size: int, block_n: int, head_dim: int, device: torch.device) -> bool:
    """Whether tiles of `block_n` keys can be TMA boxes of this cache: whole runs inside a
    page, of a power-of-two head dim, on sm_90+ (or the interpreter)."""
    return block_size % block_n == 0 and tma_supported(head_dim, device)


__all__ = [
    "LAUNCH_16BIT",
    "LAUNCH_16BIT_CONFINED",
    "LAUNCH_16BIT_CONFINED_POINTERS",
    "LAUNCH_16BIT_SMALL_HEAD",
    "LAUNCH_FP32",
    "DecodeLaunch",
    "fits_boxes",
    "launch_options",
]
