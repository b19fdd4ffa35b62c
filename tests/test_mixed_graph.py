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
from mnemosyne.layers.attention.kernel_plan import ChunkKernelConfig, HostPlan  # noqa: E402
from mnemosyne.layers.attention.static_plan import EXTRA_TILES, StaticPlans  # noqa: E402
from mnemosyne.worker.mixed_graph import MixedGraphs  # noqa: E402

BLOCK_SIZE = 4
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _backend(cfg: ModelConfig, dtype: torch.dtype) -> KernelBackend:
    # Splits of a single key step and at most 3 of them: short test contexts take the split
    # path (S = 3 for every size), with empty splits for the shortest sequences.
    return KernelBackend(
        cfg.num_heads // cfg.num_kv_heads, cfg.head_dim, dtype, DEVICE, use_cudnn=False,
        chunk_config=ChunkKernelConfig(min_split_keys=1, max_splits=3),
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


@pytest.mark.parametrize("name", ["llama", "mistral_sliding"])
@torch.inference_mode()
def test_mixed_step_matches_eager_forward(name, tiny_model_dir):
    model_dir = tiny_model_dir(name)
    dtype = torch.float32
    cfg = ModelConfig.from_pretrained(model_dir, dtype)
    ref_model = load_model(model_dir, cfg, TorchReferenceBackend(), DEVICE)
    backend = _backend(cfg, dtype)
    model = load_model(model_dir, cfg, backend, DEVICE)
    eager_caches, graph_caches = _caches(model, cfg, dtype), _caches(model, cfg, dtype)
    graphs = MixedGraphs(model, graph_caches, backend, max_tokens=32, max_blocks=8, block_size=BLOCK_SIZE,
                         device=DEVICE)  # fmt: skip
    graphs.capture_all()
    heights = graphs.plans.tile_heights
    assert sorted(graphs.metas) == [(s, h) for s in (8, 16, 24, 32) for h in heights]
    assert graphs.plans.num_splits == 3
    ran = []
    for ids, pos, meta in _mixed_steps(cfg.vocab_size):
        ids, pos, meta = ids.to(DEVICE), pos.to(DEVICE), _to(meta)
        want = ref_model(ids, pos, eager_caches, meta)
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


@torch.inference_mode()
def test_step_that_does_not_fit_gets_the_eager_plan(tiny_model_dir):
    """More chunks than the fixed tile list holds: no graph; the eager plan is left in meta."""
    model_dir = tiny_model_dir("llama")
    cfg = ModelConfig.from_pretrained(model_dir, torch.float32)
    backend = _backend(cfg, torch.float32)
    model = load_model(model_dir, cfg, backend, DEVICE)
    caches = _caches(model, cfg, torch.float32)
    graphs = MixedGraphs(model, caches, backend, max_tokens=32, max_blocks=8, block_size=BLOCK_SIZE,
                         device=DEVICE)  # fmt: skip
    graphs.capture_all()
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


def test_static_plan_fill_pads_with_minus_one():
    backend = KernelBackend(4, 16, torch.float32, torch.device("cpu"), use_cudnn=False)
    plans = StaticPlans(backend, max_tokens=64, num_kv_heads=2, block_size=16, device=torch.device("cpu"))
    block_q = plans.tile_heights[-1]
    host = HostPlan(block_q=block_q, page_tiles=plans.page_tiles, decode=[0, 2],
                    tile_seq=[1, 1], tile_q_offset=[8, 0], tiled_rows=list(range(3, 14)))  # fmt: skip
    assert plans.fits(16, host)
    plans.fill(16, host)
    plan = plans.plan_for(16, block_q)
    assert plan.decode_seq_ids.tolist() == [0, 2] + [-1] * 14
    assert plan.tile_seq.tolist() == [1, 1] + [-1] * (plans.tiles_for(16, block_q) - 2)
    assert plan.tile_q_offset.tolist()[:2] == [8, 0]
    if plan.merge_rows is not None:
        assert plan.merge_rows.tolist() == list(range(3, 14)) + [-1] * 5
    host.decode = list(range(17))
    assert not plans.fits(16, host)
