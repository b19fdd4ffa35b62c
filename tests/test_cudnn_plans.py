"""The cuDNN graphs built at start-up cover every chunk the cost model sends to cuDNN
(kernels/cudnn_plans.py), and a chunk needing a graph not built takes Triton. Host logic,
but for the float32 warm-up (its Triton merges run on the test device)."""

from __future__ import annotations

import random
from types import SimpleNamespace

import torch
from conftest import TEST_DEVICE

from mnemosyne.kernels.cudnn_plans import (
    CudnnShape,
    chunk_call_shapes,
    cudnn_chunk_lens,
    pow2_bucket,
    reachable_shapes,
)
from mnemosyne.kernels.cudnn_prefill import DenseChunk, fits_model, prefix_parts
from mnemosyne.layers.attention.kernel_backend import KernelBackend

BLOCK = 64
SEGMENT = 1 << 17


def _backend(num_heads_per_kv: int, head_dim: int) -> KernelBackend:
    backend = KernelBackend(num_heads_per_kv, head_dim, torch.bfloat16, torch.device("cpu"), use_cudnn=True)
    backend.num_sms = 132  # an H200's: the split rule depends on it
    return backend


def _meta(chunks: list[tuple[int, int]]) -> SimpleNamespace:
    """Host lists of one step: chunks (c, prefix), each sequence in one run of consecutive blocks."""
    return SimpleNamespace(
        num_seqs=len(chunks),
        query_lens_cpu=[c for c, _ in chunks],
        q_pos_start_cpu=[p for _, p in chunks],
        kv_start_cpu=[0] * len(chunks),
        kv_lens_cpu=[c + p for c, p in chunks],
        block_runs_cpu=[(0, -(-(c + p) // BLOCK)) for c, p in chunks],
    )


def test_pow2_bucket() -> None:
    assert [pow2_bucket(n) for n in (1, 2, 3, 4, 5, 1024, 1025)] == [1, 2, 4, 4, 8, 1024, 2048]


def test_prefix_parts_cover_the_keys_once() -> None:
    for num_prefix, splits, own in ((0, 1, True), (5, 1, True), (300_001, 1, False), (300_001, 4, True)):
        chunk = DenseChunk(0, 0, 77, num_prefix, own, (0, 10_000), splits)
        parts = prefix_parts(chunk, BLOCK, SEGMENT)
        first = splits * (num_prefix // splits) if splits > 1 else 0
        keys = list(range(first)) + [k for part in parts for k in range(part.k0, part.k1)]
        assert keys == list(range(num_prefix + (77 if own else 0)))
        assert all(part.k1 - part.k0 <= SEGMENT and not part.exact for part in parts if not part.causal)


def test_every_chunk_sent_to_cudnn_has_its_graphs_built() -> None:
    """Random steps of the Llama-3-8B / 3.2-1B heads: the set built at start-up changes no
    kernel choice (it is a superset of what the cost model asks), and every chunk's shapes
    are in it."""
    rng = random.Random(0)
    for num_kv_heads, group, head_dim in ((8, 4, 128), (8, 4, 64)):
        backend = _backend(group, head_dim)
        max_tokens, max_prefix = 8448, 600_000
        def cheaper(c: int, keys: int, tiles: bool, b: KernelBackend = backend, h: int = num_kv_heads) -> bool:
            return b.dense_is_cheaper(c, keys, h, tiles)

        lens = cudnn_chunk_lens(cheaper, max_tokens, max_prefix)
        assert lens and lens[-1] == max_tokens  # long chunks go to cuDNN
        built = frozenset(reachable_shapes(lens, group, num_kv_heads, max_prefix, SEGMENT, backend.num_sms))
        num_dense = 0
        for _ in range(400):
            c = rng.choice([rng.randint(2, 600), rng.randint(600, max_tokens)])
            p = rng.choice([rng.randint(0, 5000), rng.randint(0, max_prefix - c)])
            meta = _meta([(c, p)])
            backend.cudnn_shapes = None
            free = backend.host_plan(meta, num_kv_heads, None, BLOCK)
            backend.cudnn_shapes = built
            guarded = backend.host_plan(meta, num_kv_heads, None, BLOCK)
            assert guarded.dense == free.dense, (c, p)
            for chunk in guarded.dense:
                num_dense += 1
                assert set(chunk_call_shapes(chunk, group, num_kv_heads, BLOCK, SEGMENT)) <= built
        assert num_dense > 50


def test_a_chunk_whose_graph_was_not_built_takes_triton() -> None:
    backend = _backend(4, 128)
    meta = _meta([(4096, 20_000)])
    assert backend.host_plan(meta, 8, None, BLOCK).dense  # cuDNN's, by the cost model
    backend.cudnn_shapes = frozenset({CudnnShape(1, 32, 4096, 4096, True)})  # its own keys only
    plan = backend.host_plan(meta, 8, None, BLOCK)
    assert not plan.dense and plan.tile_seq  # the folded prefix's graph is missing: Triton


def test_cudnn_takes_16_bit_models_with_head_dims_up_to_128() -> None:
    assert fits_model(torch.bfloat16, 128) and fits_model(torch.float16, 80) and fits_model(torch.bfloat16, 64)
    assert not fits_model(torch.float32, 64) and not fits_model(torch.bfloat16, 256)
    assert not fits_model(torch.bfloat16, 36)


def test_warm_up_builds_no_cudnn_graph_for_a_model_cudnn_cannot_take() -> None:
    """A float32 model never reaches cuDNN: its warm-up must not call it (it would fail)."""
    device = torch.device(TEST_DEVICE)  # the warm-up also compiles the Triton merges: on the test device
    backend = KernelBackend(4, 32, torch.float32, device, use_cudnn=True)
    k_cache = torch.randn(4, 16, 2, 32, device=device)
    backend.warm_up(k_cache, torch.randn_like(k_cache), None, 1, max_num_batched_tokens=256, max_prefix_tokens=64)
    assert backend.cudnn_shapes is None
