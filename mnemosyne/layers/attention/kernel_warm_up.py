"""Start-up compilation of every attention kernel a step can launch (`KernelBackend.warm_up`
runs both halves: `build_cudnn_graphs`, `compile_triton_variants`), so
that serving never waits for Triton's JIT or a cuDNN graph build (the stalls a step must not
take while serving: a compile in the middle of a trace took one step to 2976 ms)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from mnemosyne.kernels.cudnn_plans import CudnnShape, cudnn_chunk_lens, reachable_shapes, warm_up_cudnn
from mnemosyne.kernels.decode_attention import MAX_FEW_DECODES
from mnemosyne.kernels.decode_items import seq_block
from mnemosyne.kernels.paged_prefill import plan_query_tiles
from mnemosyne.layers.attention.kernel_plan import KernelPlan
from mnemosyne.layers.attention.metadata import AttentionMetadata, to_device_packed

logger = logging.getLogger(__name__)


# The attention call the Triton half runs (`KernelBackend.forward`):
# (query, k_cache, v_cache, meta, scale, sliding_window) -> (out, lse)
AttentionCall = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata, float, int | None], tuple[torch.Tensor, torch.Tensor]
]


def build_cudnn_graphs(
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], one layer's
    v_cache: torch.Tensor,
    num_heads_per_kv: int,
    dense_is_cheaper: Callable[[int, int, bool], bool],  # (queries, keys, page tiles): cuDNN's cost wins
    max_num_batched_tokens: int,
    max_prefix_tokens: int,
    dense_segment_tokens: int,
    num_sms: int,
    exact_query_lens: tuple[int, ...] = (),
    exact_segment_keys: int = 0,
) -> frozenset[CudnnShape]:
    """Build every cuDNN graph a chunk can need (`cudnn_plans`: the chunk lengths the cost
    model may send to cuDNN up to the longest chunk, prefixes up to `max_prefix_tokens`,
    and the exact graphs of chunks of `exact_query_lens` queries) and return their shapes:
    from then on a chunk needing another one takes Triton."""
    num_kv_heads = k_cache.shape[2]
    chunk_lens = cudnn_chunk_lens(dense_is_cheaper, max_num_batched_tokens, max_prefix_tokens)
    shapes = reachable_shapes(
        chunk_lens, num_heads_per_kv, num_kv_heads, max_prefix_tokens, dense_segment_tokens, num_sms,
        [c for c in exact_query_lens if c in chunk_lens], exact_segment_keys,
    )  # fmt: skip
    seconds = warm_up_cudnn(shapes, k_cache, v_cache) if shapes else 0.0
    logger.info(
        "built %d cuDNN attention graphs in %.1f s (chunks of %s queries, prefixes up to %d keys)",
        len(shapes), seconds, f"{chunk_lens[0]}-{chunk_lens[-1]}" if chunk_lens else "no", max_prefix_tokens,
    )  # fmt: skip
    return frozenset(shapes)


def compile_triton_variants(
    forward: AttentionCall,
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], one layer's
    v_cache: torch.Tensor,
    sliding_window: int | None,
    num_heads: int,
    dtype: torch.dtype,
    max_num_decodes: int,
    block_q: int,
    page_tiles: bool,
    tile_heights: list[int],
) -> None:
    """Run every Triton variant a step can launch through `forward`, on a few keys of the
    cache (read only): the decode kernel at every batch-scan width up to `max_num_decodes`
    decodes (`seq_block`; its split budget is fixed per engine) and the chunk path at each
    tile height, direct and split with its merge."""
    block, head_dim, device = k_cache.shape[1], k_cache.shape[3], k_cache.device
    keys = min(k_cache.shape[0] * block, 2 * block_q + 8)
    # One launch per scan width (128, 256, ... up to max_num_decodes) and, at the first, one
    # per shape of phase 2 (one head per program up to MAX_FEW_DECODES decodes).
    batch_sizes = [1] + ([MAX_FEW_DECODES + 1] if max_num_decodes > MAX_FEW_DECODES else [])
    while seq_block(batch_sizes[-1]) < max_num_decodes:
        batch_sizes.append(seq_block(batch_sizes[-1]) * 2)
    for num_decodes in batch_sizes:
        meta = AttentionMetadata.build(
            [1] * num_decodes, [keys - 1] * num_decodes, [0] * num_decodes, [keys] * num_decodes,
            [list(range(-(-keys // block)))] * num_decodes, [-1] * num_decodes, device,
        )  # fmt: skip
        query = torch.zeros(num_decodes, num_heads, head_dim, dtype=dtype, device=device)
        forward(query, k_cache, v_cache, meta, 1.0, sliding_window)
    for q_len in tile_heights:
        meta = AttentionMetadata.build(
            [q_len], [keys - q_len], [0], [keys], [list(range(-(-keys // block)))], [-1] * q_len, device
        )
        seqs, offsets = plan_query_tiles([q_len], [0], q_len)
        tiles = to_device_packed((seqs, offsets, list(range(q_len))), torch.int32, device)
        query = torch.zeros(q_len, num_heads, head_dim, dtype=dtype, device=device)
        for splits in (1, 2):
            meta.backend_plan = KernelPlan(
                page_tiles=page_tiles, tile_seq=tiles[0], tile_q_offset=tiles[1], block_q=q_len,
                chunk_splits=splits, merge_rows=tiles[2],
            )  # fmt: skip
            forward(query, k_cache, v_cache, meta, 1.0, sliding_window)
