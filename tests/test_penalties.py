"""Logits processors against their references: repetition_penalty against HF's
RepetitionPenaltyLogitsProcessor, frequency/presence penalties against OpenAI's formula,
logit_bias, min_tokens; then whole greedy generations on a tiny model against a loop
over HF transformers' logits with the same processors."""

from __future__ import annotations

import pytest
import torch
from conftest import TEST_DEVICE
from tiny_models import load_hf
from transformers import RepetitionPenaltyLogitsProcessor

from mnemosyne import LLM, InvalidRequestError, SamplingParams
from mnemosyne.layers.logits_processors import TokenHistory, apply_logits_processors
from mnemosyne.layers.sampler import Sampler

VOCAB = 64
EOS = 2


def _rand(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def openai_penalties(logits: torch.Tensor, output_ids: list[int], freq: float, pres: float) -> torch.Tensor:
    """OpenAI's documented formula, element by element:
    mu[j] -> mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence."""
    out = logits.clone()
    for j in range(out.shape[0]):
        c = output_ids.count(j)
        out[j] = out[j] - c * freq - float(c > 0) * pres
    return out


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_hf_processor(penalty: float) -> None:
    logits = _rand(3, 0)
    prompts, outputs = [_ids(9, 1), _ids(4, 2), _ids(1, 3)], [_ids(5, 4), [], _ids(12, 5)]
    params = [SamplingParams(repetition_penalty=penalty, max_tokens=20)] * 3
    hists = [TokenHistory(len(p), tuple(p), (), list(o)) for p, o in zip(prompts, outputs)]
    got = apply_logits_processors(logits.clone(), params, hists)
    hf = RepetitionPenaltyLogitsProcessor(penalty)
    for i in range(3):
        ids = torch.tensor([prompts[i] + outputs[i]])
        want = hf(ids, logits[i : i + 1].clone())[0]
        torch.testing.assert_close(got[i], want, rtol=0, atol=0)


def test_frequency_and_presence_penalties_match_openai_formula() -> None:
    logits = _rand(2, 6)
    prompt = _ids(7, 7)
    outputs = [_ids(15, 8), [5, 5, 5, 9]]
    params = [
        SamplingParams(frequency_penalty=0.4, presence_penalty=-0.3, max_tokens=20),
        SamplingParams(frequency_penalty=-1.5, presence_penalty=2.0, max_tokens=20),
    ]
    hists = [TokenHistory(len(prompt), (), (), list(o)) for o in outputs]
    got = apply_logits_processors(logits.clone(), params, hists)
    for i, p in enumerate(params):
        want = openai_penalties(logits[i], outputs[i], p.frequency_penalty, p.presence_penalty)
        torch.testing.assert_close(got[i], want)
    only_prompt = [t for t in set(prompt) if t not in outputs[0]]
    torch.testing.assert_close(got[0, only_prompt], logits[0, only_prompt])  # prompt tokens: no penalty


def test_logit_bias_and_min_tokens() -> None:
    logits = _rand(2, 9)
    bias = {3: 100.0, 10: -100.0, 11: 2.5}
    params = [
        SamplingParams(logit_bias=bias, max_tokens=20),
        SamplingParams(min_tokens=3, stop_token_ids=[7], max_tokens=20),
    ]
    hist = TokenHistory(4, (), (EOS, 7), [1, 2])  # 2 of min_tokens=3 out: still banned
    got = apply_logits_processors(logits.clone(), params, [None, hist])
    want0 = logits[0].clone()
    for t, b in bias.items():
        want0[t] += b
    torch.testing.assert_close(got[0], want0)
    assert got[1, EOS] == float("-inf") and got[1, 7] == float("-inf")
    hist.output_token_ids.append(5)  # 3 out: allowed again
    again = apply_logits_processors(logits.clone(), params, [None, hist])
    torch.testing.assert_close(again[1], logits[1])


def test_sampler_logprobs_stay_raw_and_greedy_uses_processed_logits() -> None:
    logits = _rand(1, 10)
    top = int(logits[0].argmax())
    params = [SamplingParams(temperature=0, logit_bias={top: -100.0}, logprobs=0, max_tokens=4)]
    out = Sampler()(logits, params, [None], [None])
    assert out.token_ids[0] != top
    raw = torch.log_softmax(logits[0], -1)
    assert out.logprobs[0][out.token_ids[0]] == pytest.approx(float(raw[out.token_ids[0]]), abs=1e-6)


def test_history_skips_positions_seen_and_refuses_gaps() -> None:
    h = TokenHistory(num_prompt_tokens=3)
    h.observe(0, [5, 6, 7])  # prompt
    h.observe(3, [8])  # output 0 as the next decode's input
    h.observe(0, [5, 6, 7, 8])  # recomputed after preemption: nothing new
    h.observe(4, [9])
    assert h.output_token_ids == [8, 9]
    with pytest.raises(AssertionError, match="gap"):
        h.observe(7, [1])


@pytest.mark.parametrize(
    "bad",
    [
        dict(repetition_penalty=0.0),
        dict(frequency_penalty=2.5),
        dict(presence_penalty=-3.0),
        dict(logit_bias={1: 101.0}),
        dict(logit_bias={-1: 1.0}),
        dict(min_tokens=9, max_tokens=8),
    ],
)
def test_bad_values_are_refused(bad: dict) -> None:
    with pytest.raises(InvalidRequestError):
        SamplingParams(**bad)


# ---- whole generations against HF transformers' logits ------------------------------------


def hf_greedy(model, prompt: list[int], params: SamplingParams, eos: int | None = None) -> list[int]:
    """Greedy decoding over HF's full-sequence logits with the reference processors."""
    rep = RepetitionPenaltyLogitsProcessor(params.repetition_penalty or 1.0)
    ids: list[int] = list(prompt)
    out: list[int] = []
    for _ in range(params.max_tokens):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].float()
        for t, b in params.logit_bias.items():
            logits[t] += b
        if len(out) < params.min_tokens and eos is not None:
            logits[eos] = float("-inf")
        if params.repetition_penalty not in (None, 1.0):
            logits = rep(torch.tensor([ids]), logits[None])[0]
        logits = openai_penalties(logits, out, params.frequency_penalty, params.presence_penalty)
        tok = int(logits.argmax())
        ids.append(tok)
        out.append(tok)
        if tok == eos:
            break
    return out


CASES = {
    "repetition": dict(repetition_penalty=1.8),
    "repetition_below_1": dict(repetition_penalty=0.6),
    "frequency_presence": dict(frequency_penalty=1.2, presence_penalty=0.8),
    "all_with_bias": dict(
        repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.5, logit_bias={7: 3.0}
    ),
}


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    llm = LLM(
        model=str(model_dir),
        dtype="float32",
        device=TEST_DEVICE,
        block_size=4,
        chunk_size=8,
        max_num_batched_tokens=32,
        kv_cache_memory_gb=0.001,
    )
    return llm, load_hf(model_dir)


def test_penalised_greedy_generation_matches_hf(tiny) -> None:
    llm, hf = tiny
    prompts = [_ids(n, 20 + n) for n in (5, 19, 33)]
    params = {
        name: SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, **kw)
        for name, kw in CASES.items()
    }
    batch = [(name, p) for name in params for p in prompts]  # every case in one batch
    outs = llm.generate([p for _, p in batch], [params[name] for name, _ in batch])
    plain = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    changed = 0
    for (name, prompt), out in zip(batch, outs, strict=True):
        assert out.token_ids == hf_greedy(hf, prompt, params[name]), name
        changed += out.token_ids != plain[prompts.index(prompt)].token_ids
    assert changed >= len(batch) // 2, "the penalties should change most generations"


def test_min_tokens_holds_back_eos(tiny) -> None:
    llm, hf = tiny
    prompt = _ids(6, 40)
    params = SamplingParams(temperature=0, max_tokens=10, min_tokens=4, logit_bias={EOS: 100.0})
    (out,) = llm.generate([prompt], params)
    assert out.token_ids == hf_greedy(hf, prompt, params, eos=EOS)
    assert len(out.token_ids) == 5 and out.token_ids[-1] == EOS and out.finish_reason == "stop"
