"""Decode steps and mixed steps (chunks and decodes) replayed as CUDA graphs give the eager
engine's tokens and logprobs (GPU only)."""

from __future__ import annotations

import pytest
import torch
from test_exactness import make_prompts

from mnemosyne import LLM, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU"),
]


def _run(model_dir, enforce_eager: bool):
    llm = LLM(model=str(model_dir), dtype="float32", device="cuda", kv_cache_memory_gb=0.05, chunk_size=16,
              max_num_batched_tokens=64, block_size=4, enforce_eager=enforce_eager)  # fmt: skip
    prompts = make_prompts(llm.engine.config.model.vocab_size) * 3  # 12 requests: decode batches pad to 16
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=1)
    outs = llm.generate(prompts, params)
    worker = llm.engine.executor.worker
    return outs, worker.graphs, worker.mixed


@pytest.mark.parametrize("name", ["llama", "mistral_sliding"])
def test_graph_decode_matches_eager(name, tiny_model_dir):
    eager, no_graphs, no_mixed = _run(tiny_model_dir(name), enforce_eager=True)
    graphed, graphs, mixed = _run(tiny_model_dir(name), enforce_eager=False)
    assert no_graphs is None and no_mixed is None
    assert graphs is not None and len(graphs.graphs) >= 2, (
        "decode steps of several padded sizes were replayed"
    )
    assert mixed is not None and mixed.num_replays > 0, "steps with prefill chunks ran on the mixed-step graphs"
    for a, b in zip(eager, graphed, strict=True):
        assert a.token_ids == b.token_ids
        for la, lb in zip(a.logprobs, b.logprobs, strict=True):
            for tok, lp in la.items():
                assert abs(lp - lb[tok]) < 1e-4
