"""Engine API behaviour on a tiny model: bad input, aborts, seeds, stop conditions."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TEST_DEVICE

from mnemosyne import LLM, ConfigError, InvalidRequestError, ModelLoadError, SamplingParams
from mnemosyne.engine.args import EngineArgs
from mnemosyne.engine.llm_engine import LLMEngine

PROMPT = [5, 17, 33, 9, 100, 4, 250, 61, 7]


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> LLMEngine:
    args = EngineArgs(
        model=str(tiny_model_dir("llama")),
        dtype="float32",
        device=TEST_DEVICE,
        max_model_len=128,
        block_size=4,
        chunk_size=8,
        max_num_batched_tokens=32,
        kv_cache_memory_gb=0.001,
    )
    return LLMEngine.from_args(args)


def run_all(engine: LLMEngine) -> dict:
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        engine.kv_manager.check_integrity()
    return done


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, **kw)


def test_bad_requests_are_rejected_while_others_continue(engine):
    alone = engine.add_request(PROMPT, greedy(12))
    ref = run_all(engine)[alone].token_ids

    good = engine.add_request(PROMPT, greedy(12))
    engine.step()  # the good request is now running
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request([], greedy(4))
    with pytest.raises(InvalidRequestError, match="max_model_len"):
        engine.add_request(list(range(3, 123)), greedy(9))
    for bad_ids in ([1, 2, 999], [1, -1], [1, 2.5], [1, "2"], [1, 2**70], [[1], [2, 3]]):
        with pytest.raises(InvalidRequestError, match=r"\[0, 320\)"):
            engine.add_request(bad_ids, greedy(4))
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request(PROMPT, greedy(4), request_id=good)
    for bad in (
        dict(max_tokens=0),
        dict(max_tokens=-3),
        dict(temperature=-0.5),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(top_k=-2),
        dict(min_p=2.0),
    ):
        with pytest.raises(InvalidRequestError):
            SamplingParams(**bad)
    out = run_all(engine)
    assert list(out) == [good] and out[good].token_ids == ref
    assert engine.kv_manager.num_free_blocks(0) == engine.config.cache.num_blocks_per_group[0]
    numpy_ids = engine.add_request([np.int32(t) for t in PROMPT], greedy(12))
    caller_array = np.array(PROMPT, dtype=np.int64)
    array_ids = engine.add_request(caller_array, greedy(12))
    caller_array[:] = 0  # the request holds its own copy
    for rid in (numpy_ids, array_ids):
        held = engine.scheduler.get_request(rid).prompt_token_ids  # one read-only int32 array
        assert held.dtype == np.int32 and not held.flags.writeable and held.tolist() == PROMPT
    out = run_all(engine)
    assert out[numpy_ids].token_ids == ref and out[array_ids].token_ids == ref


def test_overlong_prompt_message_names_both_numbers(engine):
    with pytest.raises(InvalidRequestError) as e:
        engine.add_request(list(range(3, 123)), greedy(9))
    assert "120" in str(e.value) and "128" in str(e.value)


def test_abort_frees_blocks_and_spares_others(engine):
    a = engine.add_request(PROMPT * 3, greedy(30))
    b = engine.add_request(PROMPT, greedy(6))
    for _ in range(3):
        engine.step()
    engine.abort(a)
    engine.abort("no-such-request")  # unknown ids are ignored
    engine.kv_manager.check_integrity()
    done = run_all(engine)
    assert set(done) == {b} and len(done[b].token_ids) == 6
    assert engine.kv_manager.num_free_blocks(0) == engine.config.cache.num_blocks_per_group[0]


def test_seeded_sampling_is_reproducible_across_batches(engine):
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_tokens=10, seed=1234, ignore_eos=True)
    a = engine.add_request(PROMPT, params)
    first = run_all(engine)[a].token_ids
    others = [
        engine.add_request([11, 12, 13 + i], SamplingParams(temperature=1.0, max_tokens=5)) for i in range(3)
    ]
    b = engine.add_request(PROMPT, params)
    done = run_all(engine)
    assert done[b].token_ids == first
    assert all(o in done for o in others)
    c = engine.add_request(PROMPT, SamplingParams(temperature=1.0, max_tokens=10, seed=99, ignore_eos=True))
    assert run_all(engine)[c].token_ids != first


def test_stop_token_ids_and_length(engine):
    a = engine.add_request(PROMPT, greedy(10))
    toks = run_all(engine)[a].token_ids
    stop_at = toks[4]
    first = toks.index(stop_at)
    b = engine.add_request(PROMPT, greedy(10, stop_token_ids=[stop_at]))
    out = run_all(engine)[b]
    assert out.token_ids == toks[: first + 1] and out.finish_reason == "stop"
    c = engine.add_request(PROMPT, greedy(3))
    out = run_all(engine)[c]
    assert out.finish_reason == "length" and len(out.token_ids) == 3
    assert len(out.timing.token_times) == 3 and out.timing.ttft is not None


def test_eos_stops_unless_ignored(tiny_model_dir):
    llm = LLM(
        model=str(tiny_model_dir("llama")), dtype="float32", device=TEST_DEVICE, kv_cache_memory_gb=0.001
    )
    toks = llm.generate([PROMPT], greedy(8))[0].token_ids
    eos_tok = toks[2]  # pretend the third greedy token is the end-of-sequence token
    req_id = llm.engine.add_request(PROMPT, SamplingParams(temperature=0, max_tokens=8))
    llm.engine.scheduler.get_request(req_id).eos_token_ids = (eos_tok,)
    done = run_all(llm.engine)[req_id]
    assert done.token_ids == toks[: toks.index(eos_tok) + 1] and done.finish_reason == "stop"


def test_unknown_model_path_and_architecture(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        LLM(model=str(tmp_path / "nope"), device=TEST_DEVICE)
    bad = tmp_path / "gpt2"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ConfigError, match="unsupported architecture 'GPT2LMHeadModel'"):
        LLM(model=str(bad), device=TEST_DEVICE)
    no_weights = tmp_path / "noweights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "vocab_size": 32,
                "hidden_size": 8,
                "intermediate_size": 16,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
            }
        )
    )
    with pytest.raises(ModelLoadError, match="safetensors"):
        LLM(model=str(no_weights), device=TEST_DEVICE, kv_cache_memory_gb=0.001)


def test_request_larger_than_kv_capacity_is_rejected(tiny_model_dir):
    llm = LLM(
        model=str(tiny_model_dir("llama")),
        dtype="float32",
        device=TEST_DEVICE,
        block_size=4,
        kv_cache_memory_gb=8 * 4 * 768 / 2**30,
    )  # 8 blocks of 4 tokens = 32 tokens
    with pytest.raises(InvalidRequestError) as e:
        llm.generate([list(range(3, 30))], greedy(10))
    assert "37" in str(e.value) and "32" in str(e.value)


def test_outputs_without_copies_are_the_live_lists(engine):
    """copy_outputs=False (the serving core): each output holds the request's own lists, valid
    until the next step; the tokens are those of the copying mode."""
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=1)
    engine.add_request(PROMPT, params, request_id="copied")
    copied = run_all(engine)["copied"]
    engine.copy_outputs = False
    try:
        engine.add_request(PROMPT, params, request_id="live")
        seen = []
        while engine.has_unfinished_requests():
            for out in engine.step():
                seen.append(out)
                if out.delta_token_ids:  # the live list ends with what this step added
                    assert out.token_ids[-len(out.delta_token_ids) :] == out.delta_token_ids
    finally:
        engine.copy_outputs = True
    assert len({id(out.token_ids) for out in seen}) == 1  # one list, never copied
    assert seen[-1].finished and seen[-1].token_ids == copied.token_ids
    assert seen[-1].logprobs == copied.logprobs and len(seen[-1].timing.token_times) == 6
