"""Start-up compilation of every attention kernel a step can launch (`warm_up_kernels`, the
`KernelBackend.warm_up` of the `AttentionBackend` interface), so
that serving never waits for Triton's JIT or a cuDNN graph build (the stalls a step must not
take while serving: a compile in the middle of a trace took one step to 2976 ms)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from mnemosyne.kernels.cudnn_plans import cudnn_chunk_lens, reachable_shapes, warm_up_cudnn
from mnemosyne.kernels.cudnn_prefill import fits_model, warm_up_merges
from mnemosyne.kernels.decode_attention import MAX_FEW_DECODES
from mnemosyne.kernels.decode_items import seq_block
from mnemosyne.kernels.paged_prefill import plan_query_tiles
from mnemosyne.layers.attention.kernel_plan import KernelPlan
from mnemosyne.layers.attention.metadata import AttentionMetadata, to_device_packed

if TYPE_CHECKING:  # (kernel_backend.py calls this module: `KernelBackend.warm_up`)
    from mnemosyne.layers.attention.kernel_backend import KernelBackend

logger = logging.getLogger(__name__)


def warm_up_kernels(
    backend: KernelBackend,
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], one layer's
    v_cache: torch.Tensor,
    sliding_window: int | None,
    max_num_decodes: int = 1,
    max_num_batched_tokens: int = 0,
    max_prefix_tokens: int = 0,
) -> None:
    """Compile every Triton variant a step can launch, on a few keys of the cache (read
    only), so that serving never waits for the JIT: the chunk path (both tile heights,
    direct and split with its merge), the decode kernel at every batch-scan width up to
    `max_num_decodes` decodes (`seq_block`; its split budget is fixed per engine) and, with
    cuDNN, the merges of its partials (`warm_up_merges`) and, given the longest chunk
    (`max_num_batched_tokens`) and prefix, every cuDNN graph a chunk can need
    (`cudnn_plans`; from then on a chunk needing another one takes Triton)."""
    num_kv_heads = k_cache.shape[2]
    num_heads = num_kv_heads * backend.num_heads_per_kv
    if backend.use_cudnn:
        warm_up_merges(num_heads, backend.head_dim, backend.dtype, backend.device)
    if (
        backend.use_cudnn
        and fits_model(backend.dtype, backend.head_dim)
        and max_num_batched_tokens > 1
        and backend.cudnn_shapes is None
    ):
        chunk_lens = cudnn_chunk_lens(
            lambda c, keys, tiles: backend.dense_is_cheaper(c, keys, num_kv_heads, tiles),
            max_num_batched_tokens, max_prefix_tokens,
        )  # fmt: skip
        shapes = reachable_shapes(
            chunk_lens, backend.num_heads_per_kv, num_kv_heads, max_prefix_tokens, backend.dense_segment_tokens,
            backend.num_sms,
        )  # fmt: skip
        seconds = warm_up_cudnn(shapes, k_cache, v_cache) if shapes else 0.0
        backend.cudnn_shapes = frozenset(shapes)
        logger.info(
            "built %d cuDNN attention graphs in %.1f s (chunks of %s queries, prefixes up to %d keys)",
            len(shapes), seconds, f"{chunk_lens[0]}-{chunk_lens[-1]}" if chunk_lens else "no", max_prefix_tokens,
        )  # fmt: skip
    block = k_cache.shape[1]
    keys = min(k_cache.shape[0] * block, 2 * backend.block_q + 8)
    # One launch per scan width (128, 256, ... up to max_num_decodes) and, at the first, one
    # per shape of phase 2 (one head per program up to MAX_FEW_DECODES decodes).
    batch_sizes = [1] + ([MAX_FEW_DECODES + 1] if max_num_decodes > MAX_FEW_DECODES else [])
    while seq_block(batch_sizes[-1]) < max_num_decodes:
        batch_sizes.append(seq_block(batch_sizes[-1]) * 2)
    for num_decodes in batch_sizes:
        meta = AttentionMetadata.build(
            [1] * num_decodes, [keys - 1] * num_decodes, [0] * num_decodes, [keys] * num_decodes,
            [list(range(-(-keys // block)))] * num_decodes, [-1] * num_decodes, backend.device,
        )  # fmt: skip
        query = torch.zeros(num_decodes, num_heads, backend.head_dim, dtype=backend.dtype, device=backend.device)
        backend.forward(query, k_cache, v_cache, meta, 1.0, sliding_window)
    page_tiles = backend.uses_page_tiles(block)
    for q_len in backend.tile_heights():
        meta = AttentionMetadata.build(
            [q_len], [keys - q_len], [0], [keys], [list(range(-(-keys // block)))], [-1] * q_len, backend.device
        )
        seqs, offsets = plan_query_tiles([q_len], [0], q_len)
        tiles = to_device_packed((seqs, offsets, list(range(q_len))), torch.int32, backend.device)
        query = torch.zeros(q_len, num_heads, backend.head_dim, dtype=backend.dtype, device=backend.device)
        for splits in (1, 2):
            meta.backend_plan = KernelPlan(
                page_tiles=page_tiles, tile_seq=tiles[0], tile_q_offset=tiles[1], block_q=q_len,
                chunk_splits=splits, merge_rows=tiles[2],
            )  # fmt: skip
            backend.forward(query, k_cache, v_cache, meta, 1.0, sliding_window)
