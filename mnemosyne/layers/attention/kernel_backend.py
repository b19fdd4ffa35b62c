"""The fast attention backend: Triton kernels over the paged cache, cuDNN for long chunks.

Once per step (`plan`, from the host lists of the metadata) every sequence of the batch
goes to exactly one kernel, and every kernel writes only its own rows of one shared
(out, lse) pair::

    query_len == 1                          -> split-KV decode kernel (kernels/decode_attention.py)
    cuDNN can take it (bf16/fp16, no sliding window, keys = prefix (+ own keys)), the
    measured cost model (`kernel_cost.py`) says it is cheaper, and the prefix splits it
    wants lie in the sequence's leading run of consecutive blocks (the cost model measured
    the batched split call; a fragmented prefix runs segment by segment with too few
    programs: 1.7-2x the model on an H200 serving trace, 256-512-token chunks after 256K+),
    and every cuDNN graph its calls need was built by `warm_up` (kernel_warm_up.py,
    kernels/cudnn_plans.py: a graph built while serving stalls the step)
                                            -> cuDNN fused attention (kernels/cudnn_prefill.py);
                                               exact-length graphs for a chunk whose length
                                               `warm_up` built them for (`exact_query_lens`: a
                                               prefill lane's chunks) and whose prefix is one split
    anything else                           -> a split-KV Triton chunk kernel, one launch
                                               for all its sequences (two when a long
                                               prefix's few tiles sit beside many short
                                               ones: `tile_groups.py`), split along the keys
                                               until the GPU is full: page-aligned tiles
                                               (kernels/chunk_tma_attention.py, TMA on sm_90)
                                               when the cache's block_size is a multiple of
                                               its step (64 keys in 16-bit), else per-key
                                               gathers (kernels/chunk_splitkv_attention.py)

K/V are written by one fused Triton kernel (kernels/kv_write.py). The decode split count
is fixed by the plan; the decode kernel reads every length from device tensors, so a
decode step replays as a CUDA graph (`worker/cuda_graph.py`) with a plan built once per
padded batch size. Steps with chunks replay as graphs too (`worker/mixed_graph.py`), on
plans of fixed shape (`static_plan.py`) filled from `host_plan`'s lists each step.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging

import torch

from mnemosyne.kernels import DENSE_SEGMENT_TOKENS, EXACT_SEGMENT_KEYS
from mnemosyne.kernels.chunk_splitkv_attention import (
    DEFAULT_WAVES,
    MAX_SPLITS,
    MIN_SPLIT_KEYS,
    choose_chunk_splits,
    chunk_splitkv_attention,
)
from mnemosyne.kernels.chunk_tma_attention import (
    PAGE_TILES_MAX_SPLITS,
    PAGE_TILES_WAVES,
    chunk_tma_attention,
    fits_page_tiles,
)
from mnemosyne.kernels.cudnn_plans import (
    CudnnShape,
    chunk_call_shapes,
)
from mnemosyne.kernels.cudnn_prefill import (
    DenseChunk,
    choose_prefix_splits,
    dense_chunk_attention,
    fits,
    fits_model,
    split_prefix_is_batched,
    warm_up_merges,
)
from mnemosyne.kernels.decode_attention import paged_decode_attention
from mnemosyne.kernels.decode_items import choose_split_budget
from mnemosyne.kernels.decode_launch import launch_options
from mnemosyne.kernels.kv_write import write_kv_cache
from mnemosyne.kernels.paged_prefill import default_block_q
from mnemosyne.latency.kernel_cost import H200_COST, ChunkCostModel, ChunkPath
from mnemosyne.layers.attention.kernel_plan import (
    ChunkKernelConfig,
    HostPlan,
    KernelPlan,
    TileLaunch,
    chunk_launches,
)
from mnemosyne.layers.attention.kernel_warm_up import build_cudnn_graphs, compile_triton_variants
from mnemosyne.layers.attention.metadata import AttentionMetadata, to_device_packed
from mnemosyne.layers.attention.tile_groups import tile_group, tile_groups

logger = logging.getLogger(__name__)


class KernelBackend:
    """See the module docstring. One instance per worker; `num_heads_per_kv` and the
    model dtype fix the tile shapes."""

    def __init__(
        self,
        num_heads_per_kv: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        dense_segment_tokens: int = DENSE_SEGMENT_TOKENS,
        exact_segment_keys: int = EXACT_SEGMENT_KEYS,
        use_cudnn: bool | None = None,
        cost_model: ChunkCostModel = H200_COST,
        force_path: ChunkPath | None = None,
        chunk_config: ChunkKernelConfig | None = None,
    ) -> None:
        """force_path: every chunk cuDNN can take goes there (CUDNN), or none does
        (TRITON_SPLITKV), instead of the cheaper path by `cost_model` (tests, benchmarks)."""
        self.num_heads_per_kv = num_heads_per_kv
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = device
        self.block_q = default_block_q(num_heads_per_kv, dtype)
        self.dense_segment_tokens = dense_segment_tokens
        self.exact_segment_keys = exact_segment_keys
        self.use_cudnn = device.type == "cuda" if use_cudnn is None else use_cudnn
        cost_model.check_integrity()
        self.cost_model = cost_model
        self.force_path = force_path
        self.chunk_config = ChunkKernelConfig() if chunk_config is None else chunk_config
        self.num_sms = (
            torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
        )
        # The cuDNN graphs `warm_up` built; None (no warm-up): cuDNN takes any shape
        self.cudnn_shapes: frozenset[CudnnShape] | None = None
        # Chunk lengths whose exact cuDNN graphs `warm_up` built (`cudnn_prefill.DenseChunk.exact_keys`)
        self.exact_query_lens: frozenset[int] = frozenset()

    # ---- once per step ------------------------------------------------------------------

    def host_plan(
        self,
        meta: AttentionMetadata,
        num_kv_heads: int,
        sliding_window: int | None,
        block_size: int | None = None,
        num_sms: int | None = None,
    ) -> HostPlan:
        """Assign every sequence to a kernel, from the host lists alone (no device work).
        num_sms: the SMs the step runs on (a prefill lane split's graphs: its few); None:
        every SM of the device. Key splits are sized to fill them."""
        sms = self.num_sms if num_sms is None else num_sms
        page_tiles = self.uses_page_tiles(block_size)
        plan = HostPlan(block_q=self.block_q, page_tiles=page_tiles)
        row = 0
        runs = meta.block_runs_cpu or [(0, 0)] * meta.num_seqs
        tiled: list[int] = []
        for i, q_len in enumerate(meta.query_lens_cpu):
            chunk = None
            if self.use_cudnn and q_len > 1:
                chunk = fits(
                    i,
                    row,
                    runs[i],
                    q_len,
                    meta.q_pos_start_cpu[i],
                    meta.kv_start_cpu[i],
                    meta.kv_lens_cpu[i],
                    self.dtype,
                    self.head_dim,
                    sliding_window,
                    min_queries=2,
                )
                if chunk is not None and not self.dense_is_cheaper(
                    q_len, meta.kv_lens_cpu[i], num_kv_heads, plan.page_tiles
                ):
                    chunk = None
                if chunk is not None:  # few queries: split the prefix so that cuDNN fills the GPU
                    splits = choose_prefix_splits(
                        q_len, self.num_heads_per_kv, num_kv_heads, chunk.num_prefix, sms
                    )
                    chunk = dataclasses.replace(chunk, prefix_splits=splits)
                    if splits > 1 and block_size is not None and not split_prefix_is_batched(chunk, block_size):
                        chunk = None  # fragmented prefix: the Triton kernel walks any block table
                    else:  # its exact graphs if built, else its ragged ones; neither: Triton, never a
                        # build while serving
                        exact = splits == 1 and q_len in self.exact_query_lens
                        candidates = [dataclasses.replace(chunk, exact_keys=self.exact_segment_keys)] if exact else []
                        chunk = next(
                            (c for c in [*candidates, chunk]
                             if block_size is None or self._cudnn_is_built(c, num_kv_heads, block_size)),
                            None,
                        )  # fmt: skip
            if q_len == 1:
                plan.decode.append(i)
            elif chunk is not None:
                plan.dense.append(chunk)
            elif q_len > 0:
                tiled.append(i)
            row += q_len
        if tiled:
            # Half-height tiles when every chunk fits one (fewer padded rows); two compiled
            # variants in all, both built by `warm_up`.
            plan.block_q = self._tile_height(max(meta.query_lens_cpu[i] for i in tiled))
            plan.min_split_keys = self.min_split_keys()

            def splits_for(num_tiles: int, max_keys: int, tile_keys: int) -> int:
                return self.chunk_splits(num_tiles, num_kv_heads, max_keys, page_tiles, tile_keys, sms)

            lens = (meta.query_lens_cpu, meta.kv_lens_cpu)
            one = tile_group(*lens, tiled, plan.block_q, splits_for)
            plan.tile_seq, plan.tile_q_offset, plan.tiled_rows = one.tile_seq, one.tile_q_offset, one.rows
            plan.chunk_splits = one.splits
            plan.groups = tile_groups(one, *lens, tiled, num_kv_heads, sms, splits_for)
        return plan

    def plan(
        self,
        meta: AttentionMetadata,
        num_kv_heads: int,
        sliding_window: int | None,
        block_size: int | None = None,
    ) -> KernelPlan:
        """Assign every sequence to a kernel (`host_plan`) and send the plan's lists to the
        device. The decode kernel's split budget does not depend on the lengths, so a CUDA
        graph's plan (captured before any step) serves every step.
        block_size: the cache's; None plans the per-key-gather chunk kernel."""
        return self.device_plan(self.host_plan(meta, num_kv_heads, sliding_window, block_size), num_kv_heads)

    def device_plan(self, host: HostPlan, num_kv_heads: int) -> KernelPlan:
        """`host`'s lists on the device (one copy)."""
        plan = KernelPlan(
            block_q=host.block_q,
            page_tiles=host.page_tiles,
            chunk_splits=host.chunk_splits,
            min_split_keys=host.min_split_keys,
            dense=host.dense,
        )
        if host.decode:
            (plan.decode_seq_ids,) = to_device_packed((host.decode,), torch.int32, self.device)
            plan.split_budget = self.decode_split_budget(num_kv_heads)
        if host.groups:
            lists = [(g.tile_seq, g.tile_q_offset, g.rows if g.splits > 1 else []) for g in host.groups]
            packed = to_device_packed(tuple(itertools.chain(*lists)), torch.int32, self.device)
            plan.tile_launches = [
                TileLaunch(packed[3 * k], packed[3 * k + 1], packed[3 * k + 2] if g.splits > 1 else None, g.splits)
                for k, g in enumerate(host.groups)
            ]
        elif host.tile_seq:
            rows = host.tiled_rows if host.chunk_splits > 1 else []
            plan.tile_seq, plan.tile_q_offset, merge_rows = to_device_packed(
                (host.tile_seq, host.tile_q_offset, rows), torch.int32, self.device
            )
            plan.merge_rows = merge_rows if host.chunk_splits > 1 else None
        return plan

    def decode_split_budget(self, num_kv_heads: int) -> int:
        return choose_split_budget(num_kv_heads, self.num_sms, head_dim=self.head_dim)

    def chunk_splits(
        self,
        num_tiles: int,
        num_kv_heads: int,
        max_keys: int,
        page_tiles: bool,
        tile_keys: int | None = None,
        num_sms: int | None = None,
    ) -> int:
        """The chunk kernel's split count for num_tiles query tiles over at most max_keys keys
        on num_sms SMs (None: every SM; `choose_chunk_splits` with this backend's waves, split
        floor and cap)."""
        cfg = self.chunk_config
        return choose_chunk_splits(
            num_tiles, num_kv_heads, max_keys, self.num_sms if num_sms is None else num_sms,
            waves=cfg.waves or (PAGE_TILES_WAVES if page_tiles else DEFAULT_WAVES),
            min_split_keys=self.min_split_keys(),
            max_splits=self.max_splits(page_tiles),
            tile_keys=tile_keys,
        )  # fmt: skip

    def max_splits(self, page_tiles: bool) -> int:
        return self.chunk_config.max_splits or (PAGE_TILES_MAX_SPLITS if page_tiles else MAX_SPLITS)

    def min_split_keys(self) -> int:
        return self.chunk_config.min_split_keys or (MIN_SPLIT_KEYS if self.device.type == "cuda" else 64)

    def uses_page_tiles(self, block_size: int | None) -> bool:
        """Whether the chunk kernel can walk page-aligned steps of this cache."""
        return block_size is not None and fits_page_tiles(block_size, self.dtype)

    def tile_heights(self) -> list[int]:
        """The query tokens per tile a plan may use, ascending: block_q and half of it (fewer
        padded rows when every chunk fits half a tile; two compiled variants)."""
        return sorted({max(1, self.block_q // 2), self.block_q})

    def _tile_height(self, longest_chunk: int) -> int:
        heights = self.tile_heights()
        return heights[0] if longest_chunk <= heights[0] else heights[-1]

    def dense_is_cheaper(self, num_queries: int, num_keys: int, num_kv_heads: int, page_tiles: bool) -> bool:
        if self.force_path is not None:
            return self.force_path is ChunkPath.CUDNN
        num_heads = num_kv_heads * self.num_heads_per_kv
        cheaper = self.cost_model.cheaper(num_queries, num_keys, num_heads, self.head_dim, page_tiles)
        return cheaper is ChunkPath.CUDNN

    def _cudnn_is_built(self, chunk: DenseChunk, num_kv_heads: int, block_size: int) -> bool:
        if self.cudnn_shapes is None:
            return True
        shapes = chunk_call_shapes(chunk, self.num_heads_per_kv, num_kv_heads, block_size, self.dense_segment_tokens)
        return all(shape in self.cudnn_shapes for shape in shapes)

    def warm_up(
        self,
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], one layer's
        v_cache: torch.Tensor,
        sliding_window: int | None,
        max_num_decodes: int = 1,
        max_num_batched_tokens: int = 0,
        max_prefix_tokens: int = 0,
        exact_query_lens: tuple[int, ...] = (),
    ) -> None:
        """Compile every kernel a step can launch (`kernel_warm_up.py`), so that serving never
        waits for the JIT: every Triton variant and, with cuDNN, the merges of its partials
        (`warm_up_merges`) and, given the longest chunk (`max_num_batched_tokens`) and
        prefix, every cuDNN graph a chunk can need (`build_cudnn_graphs`), with the exact
        graphs of chunks of `exact_query_lens` queries (each at most the longest chunk)."""
        num_kv_heads = k_cache.shape[2]
        num_heads = num_kv_heads * self.num_heads_per_kv
        if self.use_cudnn:
            warm_up_merges(num_heads, self.head_dim, self.dtype, self.device)
            if fits_model(self.dtype, self.head_dim) and max_num_batched_tokens > 1 and self.cudnn_shapes is None:
                self.cudnn_shapes = build_cudnn_graphs(
                    k_cache, v_cache, self.num_heads_per_kv,
                    lambda c, keys, tiles: self.dense_is_cheaper(c, keys, num_kv_heads, tiles),
                    max_num_batched_tokens, max_prefix_tokens, self.dense_segment_tokens, self.num_sms,
                    exact_query_lens, self.exact_segment_keys,
                )  # fmt: skip
                self.exact_query_lens = frozenset(exact_query_lens)
        compile_triton_variants(
            self.forward, k_cache, v_cache, sliding_window, num_heads, self.dtype, max_num_decodes, self.block_q,
            self.uses_page_tiles(k_cache.shape[1]), self.tile_heights(),
        )  # fmt: skip

    # ---- every layer --------------------------------------------------------------------

    def write_kv(
        self,
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,  # [num_tokens] int64, -1 = skip
    ) -> None:
        if key.shape[0]:
            write_kv_cache(key, value, k_cache, v_cache, slot_mapping)

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        plan = meta.backend_plan
        if not isinstance(plan, KernelPlan):
            plan = meta.backend_plan = self.plan(meta, k_cache.shape[2], sliding_window, k_cache.shape[1])
        num_tokens, num_heads, _ = query.shape
        out = torch.empty_like(query)  # [num_tokens, num_heads, head_dim]; every row is written below
        lse = torch.empty(num_tokens, num_heads, dtype=torch.float32, device=query.device)
        lengths = (meta.query_start_loc, meta.q_pos_start, meta.kv_start, meta.kv_lens, meta.block_tables)
        if plan.decode_seq_ids is not None:
            paged_decode_attention(
                query, k_cache, v_cache, *lengths, plan.decode_seq_ids, out, lse, scale, sliding_window,
                plan.split_budget,
                *launch_options(self.head_dim, query.dtype, plan.decode_confined, k_cache.shape[1], query.device),
            )  # fmt: skip
        cfg = self.chunk_config
        kernel = chunk_tma_attention if plan.page_tiles else chunk_splitkv_attention
        for launch in chunk_launches(plan):
            kernel(
                query, k_cache, v_cache, *lengths, launch.tile_seq, launch.tile_q_offset, out, lse, scale,
                sliding_window, num_splits=launch.splits, merge_rows=launch.merge_rows, block_q=plan.block_q,
                block_n=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                min_split_keys=plan.min_split_keys,
            )  # fmt: skip
        for chunk in plan.dense:
            rows = slice(chunk.row0, chunk.row0 + chunk.num_queries)
            dense_chunk_attention(
                query[rows], k_cache, v_cache, meta.block_tables[chunk.seq], chunk, scale,
                self.dense_segment_tokens, out[rows], lse[rows],
            )  # fmt: skip
        return out, lse
