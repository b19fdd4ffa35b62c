"""Piecewise steps (everything but attention on padded static buffers, `worker/piecewise_graph.py`)
give the eager forward's hidden states and KV writes. On CPU the pieces run eagerly on the
same buffers and padding as the CUDA graphs do; the GPU test replays real graphs."""

from __future__ import annotations

import pytest
import torch
from test_exactness import make_prompts

from mnemosyne import LLM, SamplingParams
from mnemosyne.config import ModelConfig
from mnemosyne.layers.attention.metadata import AttentionMetadata
from mnemosyne.layers.attention.reference import TorchReferenceBackend
from mnemosyne.models.loader import load_model
from mnemosyne.worker.piecewise_graph import PiecewiseGraphs, piecewise_sizes

BLOCK_SIZE = 4


def test_sizes_cover_every_step_with_bounded_padding():
    sizes = piecewise_sizes(1024)
    assert sizes[0] == 8 and sizes[-1] == 1024 and sizes == sorted(set(sizes))
    for n in range(64, 1025):
        padded = next(s for s in sizes if s >= n)
        assert padded < n * (1.13 if n >= 256 else 1.25)
    assert piecewise_sizes(40) == [8, 16, 24, 32, 40]
    assert piecewise_sizes(100)[-2:] == [96, 100]


def _mixed_steps(vocab: int) -> list[tuple[torch.Tensor, torch.Tensor, AttentionMetadata]]:
    """Three sequences (blocks of 4): prefills of 13, 9 and 2 tokens; then 2 decodes and a
    19-token chunk of the third (21 rows, padded to 24); then 3 decodes (padded to 8)."""
    g = torch.Generator().manual_seed(3)
    tables = [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9, 10, 11, 12]]
    steps = []
    for starts, lens in (((0, 0, 0), (13, 9, 2)), ((13, 9, 2), (1, 1, 19)), ((14, 10, 21), (1, 1, 1))):
        pos = [p for s, n in zip(starts, lens, strict=True) for p in range(s, s + n)]
        slots = [
            tables[i][p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE
            for i in range(3)
            for p in range(starts[i], starts[i] + lens[i])
        ]
        meta = AttentionMetadata.build(
            query_lens=list(lens),
            q_pos_start=list(starts),
            kv_start=[0, 0, 0],
            kv_lens=[s + n for s, n in zip(starts, lens, strict=True)],
            block_tables=tables,
            slot_mapping=slots,
            device="cpu",
        )
        steps.append((torch.randint(3, vocab, (len(pos),), generator=g), torch.tensor(pos), meta))
    return steps


@pytest.mark.parametrize("name", ["llama", "qwen3", "mistral_sliding", "llama_linear_tied"])
@torch.inference_mode()
def test_piecewise_step_matches_eager_forward(name, tiny_model_dir):
    model_dir = tiny_model_dir(name)
    cfg = ModelConfig.from_pretrained(model_dir, torch.float32)
    model = load_model(model_dir, cfg, TorchReferenceBackend(), "cpu")
    shape = (16, BLOCK_SIZE, model.num_local_kv_heads, cfg.head_dim)
    eager_caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(model.num_local_layers)]
    piece_caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(model.num_local_layers)]
    graphs = PiecewiseGraphs(model, max_tokens=32, device=torch.device("cpu"))
    graphs.capture_all()
    assert sorted(graphs.pieces) == [8, 16, 24, 32]
    assert all(len(p) == model.num_local_layers + 1 for p in graphs.pieces.values())
    graphs.residual.fill_(float("nan"))  # stale padding rows must not reach real rows
    for ids, pos, meta in _mixed_steps(cfg.vocab_size):
        want = model(ids, pos, eager_caches, meta)
        got = graphs.run(ids, pos, piece_caches, meta)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        for (ke, ve), (kp, vp) in zip(eager_caches, piece_caches, strict=True):
            torch.testing.assert_close(kp, ke, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(vp, ve, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_piecewise_graphs_match_eager_engine(name, tiny_model_dir):
    """Mixed steps (chunks of 16 beside decodes) through replayed piecewise graphs give the
    eager engine's greedy tokens and logprobs."""

    def run(enforce_eager: bool):
        llm = LLM(model=str(tiny_model_dir(name)), dtype="float32", device="cuda", kv_cache_memory_gb=0.05,
                  chunk_size=16, max_num_batched_tokens=64, block_size=4, enforce_eager=enforce_eager)  # fmt: skip
        prompts = make_prompts(llm.engine.config.model.vocab_size) * 3
        params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=1)
        return llm.generate(prompts, params), llm.engine.executor.worker.piecewise

    eager, none = run(enforce_eager=True)
    graphed, piecewise = run(enforce_eager=False)
    assert none is None and piecewise is not None and piecewise.use_graphs
    for a, b in zip(eager, graphed, strict=True):
        assert a.token_ids == b.token_ids
        for la, lb in zip(a.logprobs, b.logprobs, strict=True):
            for tok, lp in la.items():
                assert abs(lp - lb[tok]) < 1e-4
