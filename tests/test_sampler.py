"""Sampler: greedy, filtering masks, seeded reproducibility, logprobs."""

from __future__ import annotations

import pytest
import torch

from mnemosyne.layers.sampler import Sampler, SamplerOutput, compute_prompt_logprobs
from mnemosyne.sampling_params import SamplingParams

VOCAB = 50


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_greedy_is_argmax() -> None:
    logits = torch.randn(6, VOCAB, generator=seeded(0))
    logits[2, 7] = logits[2, 9] = logits[2].max() + 1.0  # tie -> lowest index
    out = Sampler()(logits, [SamplingParams(temperature=0.0)] * 6, [None] * 6)
    assert isinstance(out, SamplerOutput)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.token_ids[2] == 7
    assert out.logprobs == [None] * 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_top_k_1_is_greedy(dtype: torch.dtype) -> None:
    logits = torch.randn(8, VOCAB, generator=seeded(1)).to(dtype)
    params = [SamplingParams(temperature=1.5, top_k=1)] * 8
    out = Sampler()(logits, params, [seeded(i) for i in range(8)])
    assert out.token_ids == logits.float().argmax(-1).tolist()


def test_seed_reproducible_and_batch_independent() -> None:
    logits = torch.randn(5, VOCAB, generator=seeded(2))
    params = [
        SamplingParams(temperature=1.0, seed=11),
        SamplingParams(temperature=0.7, top_p=0.9, seed=12),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.3, top_k=10, min_p=0.05, seed=13),
        SamplingParams(temperature=2.0, seed=14),
    ]
    sampler = Sampler()

    def run(order: list[int], steps: int = 8) -> dict[int, list[int]]:
        gens = {i: seeded(params[i].seed or 0) for i in order}
        toks: dict[int, list[int]] = {i: [] for i in order}
        for _ in range(steps):
            out = sampler(logits[order], [params[i] for i in order], [gens[i] for i in order])
            for i, t in zip(order, out.token_ids):
                toks[i].append(t)
        return toks

    full = run([0, 1, 2, 3, 4])
    assert full == run([0, 1, 2, 3, 4])
    assert len(set(full[4])) > 1  # high temperature over 8 draws: not constant
    for order in ([4, 3, 2, 1, 0], [3], [1, 4], [2, 0]):
        sub = run(order)
        assert all(sub[i] == full[i] for i in order)


def test_default_rng_used_when_no_generator() -> None:
    logits = torch.zeros(1, VOCAB)
    params = [SamplingParams(temperature=1.0)]
    torch.manual_seed(5)
    a = [Sampler()(logits, params, [None]).token_ids[0] for _ in range(10)]
    torch.manual_seed(5)
    b = [Sampler()(logits, params, [None]).token_ids[0] for _ in range(10)]
    assert a == b and len(set(a)) > 1


def peaked_logits() -> torch.Tensor:
    # probs ~ 0.5, 0.25, 0.125, ... over tokens 3, 17, 8, 40, ... (token ids shuffled)
    order = torch.randperm(VOCAB, generator=seeded(3))
    logits = torch.empty(VOCAB)
    logits[order] = -torch.arange(VOCAB, dtype=torch.float32) * 0.6931471805599453
    return logits


def sample_many(logits: torch.Tensor, params: SamplingParams, n: int = 400) -> set[int]:
    rows = logits.expand(n, -1)
    out = Sampler()(rows, [params] * n, [seeded(1000 + i) for i in range(n)])
    return set(out.token_ids)


def ranked(logits: torch.Tensor) -> list[int]:
    return torch.argsort(logits, descending=True).tolist()


@pytest.mark.parametrize(("top_p", "allowed"), [(0.4, 1), (0.55, 2), (0.6, 2), (0.8, 3), (0.9, 4)])
def test_top_p_mask(top_p: float, allowed: int) -> None:
    logits = peaked_logits()
    got = sample_many(logits, SamplingParams(temperature=1.0, top_p=top_p))
    assert got == set(ranked(logits)[:allowed])


@pytest.mark.parametrize(("min_p", "allowed"), [(0.6, 1), (0.3, 2), (0.2, 3), (0.1, 4)])
def test_min_p_mask(min_p: float, allowed: int) -> None:
    logits = peaked_logits()
    got = sample_many(logits, SamplingParams(temperature=1.0, min_p=min_p))
    assert got == set(ranked(logits)[:allowed])


def test_top_k_mask_and_combination() -> None:
    logits = torch.zeros(VOCAB)  # uniform: top-k keeps the k lowest ids among ties
    assert sample_many(logits, SamplingParams(temperature=1.0, top_k=3)) == {0, 1, 2}
    peaked = peaked_logits()
    # top_p acts on the renormalised top-5 (0.516, 0.258, 0.129, 0.065, 0.032): mass before
    # rank 3 is 0.903 >= 0.9 -> 3 tokens (4 without renormalisation).
    got = sample_many(peaked, SamplingParams(temperature=1.0, top_k=5, top_p=0.9))
    assert got == set(ranked(peaked)[:3])
    # Temperature sharpens before filtering: probs ~ 4^-r, min_p=0.3 keeps only the top token.
    got = sample_many(peaked, SamplingParams(temperature=0.5, min_p=0.3))
    assert got == {ranked(peaked)[0]}


def test_unfiltered_sampling_covers_distribution() -> None:
    logits = torch.zeros(8)
    got = sample_many(logits, SamplingParams(temperature=1.0), n=400)
    assert got == set(range(8))


def test_sampled_logprobs() -> None:
    logits = (torch.randn(4, VOCAB, generator=seeded(4)) * 3).bfloat16()
    params = [
        SamplingParams(temperature=0.0, logprobs=3),
        SamplingParams(temperature=1.0, top_k=5, logprobs=0),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=5.0, logprobs=2),
    ]
    out = Sampler()(logits, params, [seeded(i) for i in range(4)])
    ref = torch.log_softmax(logits.float(), dim=-1)  # raw distribution, not temperature-scaled
    assert out.logprobs[2] is None
    for i, k in ((0, 3), (1, 0), (3, 2)):
        d = out.logprobs[i]
        assert d is not None
        tok = out.token_ids[i]
        top = torch.topk(ref[i], k).indices.tolist() if k else []
        assert set(d) == {tok, *top}
        assert len(d) <= k + 1
        for t, lp in d.items():
            assert lp == pytest.approx(ref[i, t].item(), abs=1e-6)
    assert len(out.logprobs[0]) == 3  # greedy token is the top-1


def test_prompt_logprobs() -> None:
    logits = torch.randn(5, VOCAB, generator=seeded(5))
    targets = torch.tensor([3, 0, 49, 7, 7])
    res = compute_prompt_logprobs(logits, targets, 2)
    ref = torch.log_softmax(logits.double(), dim=-1)
    assert len(res) == 5
    for i, d in enumerate(res):
        top = torch.topk(ref[i], 2).indices.tolist()
        assert set(d) == {int(targets[i]), *top}
        assert next(iter(d)) == int(targets[i])
        for t, lp in d.items():
            assert lp == pytest.approx(ref[i, t].item(), abs=1e-5)
    assert [list(d) for d in compute_prompt_logprobs(logits, targets, 0)] == [[t] for t in targets.tolist()]
    assert compute_prompt_logprobs(logits[:0], targets[:0], 3) == []


def test_empty_batch() -> None:
    out = Sampler()(torch.zeros(0, VOCAB), [], [])
    assert out.token_ids == [] and out.logprobs == []
