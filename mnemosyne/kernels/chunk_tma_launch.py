"""Launch options of the page-aligned chunk kernel (`chunk_tma_attention`): which caches it
serves, the keys per step and how a step is cut into page boxes (`step_boxes`, drawn in that
module's docstring), and the tile / warp / stage defaults measured on an H200."""

from __future__ import annotations

import torch

from mnemosyne.kernels.chunk_splitkv_attention import tile_launch


def tma_step_keys(dtype: torch.dtype) -> int:
    """Keys per step of the page-aligned walk at head dim 128: 64 (16-bit) or 32 (float32);
    the block sizes the engine runs this kernel on are multiples of it (`fits_page_tiles`)."""
    return 64 if dtype.itemsize <= 2 else 32


def fits_page_tiles(block_size: int, dtype: torch.dtype) -> bool:
    """Whether a cache of this block size takes whole `tma_step_keys` steps (what the engine
    runs this kernel with; smaller steps were not measured faster than per-key gathers)."""
    return block_size % tma_step_keys(dtype) == 0


# Launch defaults at head dim <= 64 in 16-bit, from the H200 sweep of the Llama-3.2-1B heads
# (32 / 8, head dim 64; benchmarks/results/chunk_kernel_variants_1b_h200_2026-11-29.json,
# geometric mean of time / floor over c in {16 .. 256} x P in {128K, 512K}, page 128, TMA):
#   block_n 128: block_m 64, 4 warps, 4 stages 1.76x (3 stages 1.81x); block_m 128, 4 warps
#                1.87-1.91x (spills), 8 warps 2.48-2.61x
#   block_n 64:  block_m 64, 4 warps 2.02x; block_m 128, 8 warps 2.09x, 4 warps 2.22x
# Half the MMA work per loaded byte of head dim 128: a 64-key step is too short, its softmax
# bookkeeping dominates. So 128-key steps (two pages at block_size 64). The M tile stays the
# engine's (`default_block_q`: 128 rows, 64 for chunks of <= 16 tokens): with two-page steps
# at block_size 64 (chunk_kernel_variants_1b_multipage_h200_2026-11-29.json, same grid),
# block_m 128 / 4 warps / 3 stages 1.82x, block_m 64 2.0-2.1x (2.6x at c = 64; 1.06-1.16x
# at c = 16 after 512K, which the engine's half-height tiles take).
# Head dim 128 keeps `tile_launch`'s defaults and 64-key steps (near their best there).
SMALL_HEAD_DIM = 64
SMALL_HEAD_STEP_KEYS = 128
_SMALL_HEAD_LAUNCH = {(64, 128): (4, 4), (128, 128): (4, 3), (64, 64): (4, 3), (128, 64): (8, 3)}
MAX_STEP_PAGES = 4  # pages (score tiles) of one multi-page step


def _small_head(head_dim: int, dtype: torch.dtype) -> bool:
    return dtype.itemsize <= 2 and head_dim <= SMALL_HEAD_DIM


def default_tma_block_n(page: int, dtype: torch.dtype, head_dim: int) -> int:
    """Keys per step: `tma_step_keys`, capped by the page size; 128 (one or two pages) at
    head dim <= 64 in 16-bit where the page is a multiple of 128 or exactly a whole step."""
    step = tma_step_keys(dtype)
    if _small_head(head_dim, dtype):
        wide = SMALL_HEAD_STEP_KEYS
        if page % wide == 0 or (page % step == 0 and wide % page == 0):
            return wide
    return min(step, page)



def step_boxes(block_n: int, page: int) -> tuple[int, int]:
    """(box, num_boxes): the rows of one TMA box and the boxes (pages) of one BLOCK_N-key step.
    Single-page steps: block_n a power of two >= 16 dividing the page. Multi-page steps:
    block_n = 2 .. MAX_STEP_PAGES whole pages of a power-of-two page >= 16. Else ValueError."""
    if block_n >= 16 and not block_n & (block_n - 1) and page % block_n == 0:
        return block_n, 1
    if (
        page >= 16
        and not page & (page - 1)
        and block_n % page == 0
        and 2 <= block_n // page <= MAX_STEP_PAGES
    ):
        return page, block_n // page
    raise ValueError(
        f"chunk_tma_attention needs block_n a power of two >= 16 dividing the cache's block_size (one "
        f"step = one run inside a page), or 2 .. {MAX_STEP_PAGES} whole pages of a power-of-two "
        f"block_size >= 16 (one run per page); got block_n {block_n}, block_size {page}"
    )


def tma_tile_launch(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    num_heads_per_kv: int,
    block_q: int | None,
    block_n: int,
    num_warps: int | None,
    num_stages: int | None,
) -> tuple[int, int, int, int, int]:
    """`tile_launch` with the head-dim-64 warps / stages of the sweep above for the Nones."""
    head_dim = query.shape[-1]
    block_q, block_m, block_d, warps, stages = tile_launch(
        query, num_heads_per_kv, block_q, num_warps, num_stages
    )
    if _small_head(head_dim, query.dtype) and (block_m, block_n) in _SMALL_HEAD_LAUNCH:
        table_warps, table_stages = _SMALL_HEAD_LAUNCH[block_m, block_n]
        warps = table_warps if num_warps is None else num_warps
        stages = table_stages if num_stages is None else num_stages
    return block_q, block_m, block_d, warps, stages
