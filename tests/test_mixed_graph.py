"""Whole small steps on fixed attention plans (`worker/mixed_graph.py`,
`layers/attention/static_plan.py`) give the eager forward's hidden states and KV writes.

On CPU the kernels run under the Triton interpreter, and each padded size runs eagerly on
the same static buffers, padding entries (-1) and fixed grids as its CUDA graph replays;
the GPU test replays real graphs."""

from __future__ import annotations

import os

import pytest
import torch
from test_piecewise_graph import _mixed_steps

from mnemosyne.config import ModelConfig
from mnemosyne.layers.attention.metadata import AttentionMetadata
from mnemosyne.layers.attention.reference import TorchReferenceBackend
from mnemosyne.models.loader import load_model

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from mnemosyne.layers.attention.kernel_backend import KernelBackend  # noqa: E402
from mnemosyne.layers.attention.kernel_plan import ChunkKernelConfig, HostPlan, TileGroup  # noqa: E402
from mnemosyne.layers.attention.static_plan import EXTRA_TILES, MAX_SPLIT_GRAPH_TOKENS, StaticPlans  # noqa: E402
from mnemosyne.worker.mixed_graph import MixedGraphs  # noqa: E402

BLOCK_SIZE = 4
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _backend(cfg: ModelConfig, dtype: torch.dtype, min_split_keys: int = 1) -> KernelBackend:
    # At most 3 splits. Splits of a single key step: short test contexts take the split path
    # (the S = 3 graphs), with empty splits for the shortest sequences. Of 64 keys: every
    # eager plan here takes one split (the S = 1 graphs).
    return KernelBackend(
        cfg.num_heads // cfg.num_kv_heads, cfg.head_dim, dtype, DEVICE, use_cudnn=False,
        chunk_config=ChunkKernelConfig(min_split_keys=min_split_keys, max_splits=3),
    )  # fmt: skip


def _caches(model, cfg: ModelConfig, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shape = (16, BLOCK_SIZE, model.num_local_kv_heads, cfg.head_dim)
    return [
        (torch.zeros(shape, dtype=dtype, device=DEVICE), torch.zeros(shape, dtype=dtype, device=DEVICE))
        for _ in range(model.num_local_layers)
    ]


def _to(meta: AttentionMetadata) -> AttentionMetadata:
    return AttentionMetadata.build(
        meta.query_lens_cpu, meta.q_pos_start_cpu, meta.kv_start_cpu, meta.kv_lens_cpu,
        [row[: -(-n // BLOCK_SIZE)].cpu() for row, n in zip(meta.block_tables, meta.kv_lens_cpu, strict=True)],
        meta.slot_mapping.tolist(), DEVICE,
    )  # fmt: skip


def _llama_graphs(tiny_model_dir, max_seqs: int | None = None) -> tuple[ModelConfig, MixedGraphs]:
    """The tiny float32 Llama's graphs of up to 32 tokens, captured (on CPU: plans only)."""
    model_dir = tiny_model_dir("llama")
    cfg = ModelConfig.from_pretrained(model_dir, torch.float32)
    backend = _backend(cfg, torch.float32)
    model = load_model(model_dir, cfg, backend, DEVICE)
    graphs = MixedGraphs(model, _caches(model, cfg, torch.float32), backend, max_tokens=32, max_blocks=8,
                         block_size=BLOCK_SIZE, device=DEVICE, max_seqs=max_seqs)  # fmt: skip
    graphs.capture_all()
    return cfg, graphs


@pytest.mark.parametrize(("name", "min_split_keys"), [("llama", 1), ("mistral_sliding", 1), ("llama", 64)])
@torch.inference_mode()
def test_mixed_step_matches_eager_forward(name, min_split_keys, tiny_model_dir):
    model_dir = tiny_model_dir(name)
    dtype = torch.float32
    cfg = ModelConfig.from_pretrained(model_dir, dtype)
    ref_model = load_model(model_dir, cfg, TorchReferenceBackend(), DEVICE)
    backend = _backend(cfg, dtype, min_split_keys)
    model = load_model(model_dir, cfg, backend, DEVICE)
    eager_caches, graph_caches = _caches(model, cfg, dtype), _caches(model, cfg, dtype)
    # Block tables of 3 rows (the steps' sequences) under graphs of up to 32 tokens
    graphs = MixedGraphs(model, graph_caches, backend, max_tokens=32, max_blocks=8, block_size=BLOCK_SIZE,
                         device=DEVICE, max_seqs=3)  # fmt: skip
    graphs.capture_all()
    assert graphs.block_tables.shape == (3, 8)
    heights = graphs.plans.tile_heights
    assert graphs.plans.num_splits == 3 and graphs.plans.split_counts == [1, 3]
    assert sorted(graphs.metas) == [(s, h, n) for s in (8, 16, 24, 32) for h in heights for n in (1, 3)]
    ran, splits = [], []
    for ids, pos, meta in _mixed_steps(cfg.vocab_size):
        ids, pos, meta = ids.to(DEVICE), pos.to(DEVICE), _to(meta)
        want = ref_model(ids, pos, eager_caches, meta)
        if meta.max_query_len > 1:
            host = backend.host_plan(meta, model.num_local_kv_heads, cfg.sliding_window, BLOCK_SIZE)
            splits.append(graphs.plans.splits_for(host))
        got = graphs.try_run(ids, pos, meta)
        ran.append(got is not None)
        if got is None:  # a decode-only step: not this class's
            assert meta.max_query_len == 1
            got = model(ids, pos, graph_caches, meta)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        for (ke, ve), (kg, vg) in zip(eager_caches, graph_caches, strict=True):
            torch.testing.assert_close(kg, ke, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(vg, ve, atol=1e-5, rtol=1e-5)
    assert ran == [True, True, False]
    assert splits == ([3, 3] if min_split_keys == 1 else [1, 1])  # the graphs of either split count ran


@torch.inference_mode()
def test_step_that_does_not_fit_gets_the_eager_plan(tiny_model_dir):
    """More chunks than the fixed tile list holds: no graph; the eager plan is left in meta."""
    _, graphs = _llama_graphs(tiny_model_dir)
    num_chunks = graphs.plans.tiles_for(32, graphs.plans.tile_heights[0]) + 1  # 2 tokens each: a tile each
    assert num_chunks <= 16 and EXTRA_TILES < num_chunks
    meta = AttentionMetadata.build(
        [2] * num_chunks, [0] * num_chunks, [0] * num_chunks, [2] * num_chunks,
        [[i] for i in range(num_chunks)], [i * BLOCK_SIZE + j for i in range(num_chunks) for j in range(2)],
        DEVICE,
    )  # fmt: skip
    ids = torch.ones(2 * num_chunks, dtype=torch.long, device=DEVICE)
    pos = torch.tensor([0, 1] * num_chunks, device=DEVICE)
    assert graphs.try_run(ids, pos, meta) is None
    assert meta.backend_plan is not None and len(meta.backend_plan.tile_seq) == num_chunks


@torch.inference_mode()
def test_step_of_more_sequences_than_the_block_table_rows_is_left_to_the_other_paths(tiny_model_dir):
    cfg, graphs = _llama_graphs(tiny_model_dir, max_seqs=2)
    ids, pos, meta = _mixed_steps(cfg.vocab_size)[1]  # 3 sequences
    assert graphs.try_run(ids.to(DEVICE), pos.to(DEVICE), _to(meta)) is None
    assert graphs.num_replays == 0


def test_static_plan_fill_pads_with_minus_one():
    backend = KernelBackend(4, 16, torch.float32, torch.device("cpu"), use_cudnn=False)
    plans = StaticPlans(backend, max_tokens=64, num_kv_heads=2, block_size=16, device=torch.device("cpu"))
    block_q = plans.tile_heights[-1]
    host = HostPlan(block_q=block_q, page_tiles=plans.page_tiles, decode=[0, 2],
                    tile_seq=[1, 1], tile_q_offset=[8, 0], tiled_rows=list(range(3, 14)))  # fmt: skip
    assert plans.fits(16, host)
    plans.fill(16, host)
    plan = plans.plan_for(16, block_q, plans.num_splits)
    assert plan.decode_seq_ids.tolist() == [0, 2] + [-1] * 14
    assert plan.tile_seq.tolist() == [1, 1] + [-1] * (plans.tiles_for(16, block_q) - 2)
    assert plan.tile_q_offset.tolist()[:2] == [8, 0]
    if plan.merge_rows is not None:
        assert plan.merge_rows.tolist() == list(range(3, 14)) + [-1] * 5
    host.decode = list(range(17))
    assert not plans.fits(16, host)


def test_static_plan_split_count_follows_the_eager_plan():
    """One split in every eager launch: the graph of one split (no partials, no merge);
    any launch with more: the graph of the most."""
    backend = KernelBackend(4, 16, torch.float32, torch.device("cpu"), use_cudnn=False,
                            chunk_config=ChunkKernelConfig(max_splits=8))  # fmt: skip
    plans = StaticPlans(backend, max_tokens=64, num_kv_heads=2, block_size=16, device=torch.device("cpu"))
    assert plans.split_counts == [1, plans.num_splits] and plans.num_splits == 8
    host = HostPlan(block_q=plans.tile_heights[-1], page_tiles=plans.page_tiles, tile_seq=[0], tile_q_offset=[0],
                    tiled_rows=list(range(8)), chunk_splits=1)  # fmt: skip
    assert plans.splits_for(host) == 1
    assert plans.plan_for(16, host.block_q, 1).merge_rows is None
    host.chunk_splits = 2
    assert plans.splits_for(host) == 8
    host.chunk_splits = 1
    host.groups = [TileGroup([0], [0], [], 1), TileGroup([1], [0], list(range(8, 12)), 3)]
    assert plans.splits_for(host) == 8


def test_large_graphs_hold_only_the_one_split_plan():
    """Over MAX_SPLIT_GRAPH_TOKENS a step fits only with one split; a step needing more runs
    piecewise."""
    backend = KernelBackend(4, 16, torch.float32, torch.device("cpu"), use_cudnn=False,
                            chunk_config=ChunkKernelConfig(max_splits=8))  # fmt: skip
    plans = StaticPlans(backend, max_tokens=1024, num_kv_heads=2, block_size=16, device=torch.device("cpu"))
    big, small = MAX_SPLIT_GRAPH_TOKENS + 64, MAX_SPLIT_GRAPH_TOKENS
    assert plans.split_counts_for(big) == [1] and plans.split_counts_for(small) == [1, 8]
    block_q = plans.tile_heights[0]
    host = HostPlan(block_q=block_q, page_tiles=plans.page_tiles, decode=[1], tile_seq=[0] * (500 // block_q + 1),
                    tile_q_offset=list(range(0, 500, block_q)), tiled_rows=list(range(500)), chunk_splits=1)  # fmt: skip
    assert plans.fits(big, host) and plans.fits(small, host)
    host.chunk_splits = 3
    assert not plans.fits(big, host) and plans.fits(small, host)
