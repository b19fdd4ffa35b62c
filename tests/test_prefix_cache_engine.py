"""Prefix caching through the whole engine, against HF transformers and the same run without
the cache: greedy tokens identical, sampled-token logprobs (logprobs=1) within 1e-4.

The workload (block size 4): a 45-token document asked about in turn 1; then, in one batch,
other questions about it, prompts diverging at a block boundary and mid-block, a repeat of
turn 1 (its whole prompt cached: the last token is still computed), and turn 2 of the
conversation (turn 1's prompt + its answer + a question: hits blocks written by decodes).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TEST_DEVICE
from test_parallel import skip_without_gpus
from tiny_models import COMMON as TINY_COMMON
from tiny_models import load_hf

from mnemosyne import LLM, SamplingParams

BLOCK = 4
NUM_NEW = 12
ATOL = 1e-4
MODEL = "llama"
PARAMS = SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True, logprobs=1)
ENGINE = dict(
    dtype="float32", device=TEST_DEVICE, block_size=BLOCK, worker_timeout_s=60, kv_cache_memory_gb=0.004
)


def _rand(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, TINY_COMMON["vocab_size"], (n,), generator=g).tolist()


DOC = _rand(45, 1)
TURN1 = DOC + _rand(5, 2)


def second_wave(turn1_answer: list[int]) -> list[list[int]]:
    return [
        DOC + _rand(7, 3),  # another question: 44 tokens (11 blocks) cached
        DOC[:16] + _rand(9, 4),  # diverges at a block boundary
        DOC[:18] + _rand(6, 5),  # diverges mid-block: 16 cached
        list(TURN1),  # wholly cached but for the last token
        DOC[:44],  # exactly 11 full blocks: 10 taken, the last one recomputed
        TURN1 + turn1_answer + _rand(3, 6),  # turn 2
    ]


MAX_LEN = len(TURN1) + NUM_NEW + 3 + NUM_NEW  # turn 2


_HF: dict[tuple[int, ...], tuple[list[int], torch.Tensor]] = {}
_HF_MODEL: dict[str, object] = {}


def hf_reference(model_dir, prompt: list[int] | np.ndarray) -> tuple[list[int], torch.Tensor]:
    prompt = [int(t) for t in prompt]  # an engine output's prompt ids are its request's int32 array
    key = tuple(prompt)
    if key not in _HF:
        if str(model_dir) not in _HF_MODEL:
            _HF_MODEL[str(model_dir)] = load_hf(model_dir)
        hf = _HF_MODEL[str(model_dir)]
        with torch.no_grad():
            gen = hf.generate(
                torch.tensor([prompt]),
                max_new_tokens=NUM_NEW,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
            logp = torch.log_softmax(hf(gen).logits[0].double(), dim=-1)  # [seq, vocab]
        _HF[key] = (gen[0, len(prompt) :].tolist(), logp)
    return _HF[key]


def run_workload(llm: LLM) -> list:
    """Turn 1 alone, then the second wave in one batch; integrity after every step."""
    engine = llm.engine
    outs = []
    for wave in ([TURN1], None):
        prompts = second_wave(outs[0].token_ids) if wave is None else wave
        ids = [engine.add_request(p, PARAMS) for p in prompts]
        done = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out
            engine.kv_manager.check_integrity()
        outs += [done[i] for i in ids]
    assert engine.kv_manager.usage() == [0.0] * engine.kv_manager.num_kvp_groups
    return outs


def assert_matches_hf(model_dir, outs: list, what: str) -> None:
    for out in outs:
        ref_new, ref_logp = hf_reference(model_dir, out.prompt_token_ids)
        assert out.token_ids == ref_new, f"{what}: greedy tokens differ from HF"
        n = len(out.prompt_token_ids)
        for i, (tok, entry) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
            assert abs(entry[tok] - ref_logp[n + i - 1, tok].item()) < ATOL, f"{what}: logprob {i}"


def assert_same(ref: list, got: list, what: str) -> None:
    for r, g in zip(ref, got, strict=True):
        assert g.token_ids == r.token_ids, f"{what}: tokens differ from the run without the cache"
        for tok, a, b in zip(r.token_ids, r.logprobs, g.logprobs, strict=True):
            assert abs(a[tok] - b[tok]) < ATOL, f"{what}: logprob differs from the run without the cache"


EXPECTED_CACHED = [0, 44, 16, 16, 48, 40, 60]  # turn 2 hits turn 1's 48 prompt + 12 answer tokens


_PLAIN: dict[str, list] = {}


def uncached_run(model_dir) -> list:
    """The workload without the cache (chunk 64), once per session."""
    if "plain" not in _PLAIN:
        with LLM(model=str(model_dir), enable_prefix_caching=False, **ENGINE, chunk_size=64) as llm:
            _PLAIN["plain"] = run_workload(llm)
            assert llm.engine.stats().prefix_cache_queries == 0
    return _PLAIN["plain"]


@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_cached_runs_match_hf_and_the_uncached_run(chunk_size, tiny_model_dir):
    model_dir = tiny_model_dir(MODEL)
    plain = uncached_run(model_dir)
    with LLM(model=str(model_dir), **ENGINE, chunk_size=chunk_size, max_num_batched_tokens=64) as llm:
        cached = run_workload(llm)  # the cache is on by default
        stats = llm.engine.stats()
    assert [o.num_cached_tokens for o in plain] == [0] * len(plain)
    assert [o.num_cached_tokens for o in cached] == EXPECTED_CACHED
    assert stats.prefix_cache_hits == sum(EXPECTED_CACHED)
    assert stats.prefix_cache_queries == sum(len(o.prompt_token_ids) for o in cached)
    assert stats.num_cached_blocks > 0
    assert_same(plain, cached, f"chunk {chunk_size}")
    assert_matches_hf(model_dir, cached, f"chunk {chunk_size}")


def test_cache_under_preemption_and_eviction_pressure(tiny_model_dir):
    """A KV budget of 24 blocks for 7 requests of up to 20 blocks: preemptions (the readmitted
    request takes its own cached blocks back) and evictions of cached blocks."""
    model_dir = tiny_model_dir(MODEL)
    with LLM(model=str(model_dir), dtype="float32", device=TEST_DEVICE, kv_cache_memory_gb=0.01) as probe:
        bytes_per_block = BLOCK * probe.engine.config.model.kv_bytes_per_token
    gb = 24 * bytes_per_block / 2**30
    with LLM(
        model=str(model_dir), **{**ENGINE, "kv_cache_memory_gb": gb}, chunk_size=8, max_num_batched_tokens=24
    ) as llm:
        outs = run_workload(llm)
        engine = llm.engine
        evictions = engine.kv_manager.pool(0).num_evictions
        stats = engine.stats()
    assert sum(o.num_preemptions for o in outs) > 0 and evictions > 0 and stats.prefix_cache_hits > 0
    assert_matches_hf(model_dir, outs, "tiny KV budget")


def test_workers_never_rewrite_cached_blocks(tiny_model_dir):
    """K/V of every block cached after turn 1 is bitwise unchanged after the second wave reused it."""
    model_dir = tiny_model_dir(MODEL)
    with LLM(model=str(model_dir), **ENGINE, chunk_size=7, max_num_batched_tokens=32) as llm:
        engine = llm.engine
        engine.add_request(TURN1, PARAMS)
        while engine.has_unfinished_requests():
            engine.step()
        pool = engine.kv_manager.pool(0)
        cached = [b for b in range(pool.num_blocks) if pool.block_hash(b) is not None]
        caches = engine.executor.worker.kv_caches
        before = [(k[cached].clone(), v[cached].clone()) for k, v in caches]
        answer = llm.generate([TURN1], PARAMS)[0].token_ids
        llm.generate(second_wave(answer), PARAMS)
        assert all(pool.block_hash(b) is not None for b in cached)  # nothing evicted: room to spare
        for (k, v), (k0, v0) in zip(caches, before, strict=True):
            assert torch.equal(k[cached], k0) and torch.equal(v[cached], v0)


def tokens_per_group(kvp: int) -> int:
    t = -(-MAX_LEN // kvp)
    return -(-t // BLOCK) * BLOCK


# The shared 45-token document spans the group boundary at T (40 for kvp 2, 28 for kvp 3).
LAYOUTS = [("kvp2", dict(kvp=2)), ("kvp3", dict(kvp=3)), ("spp2", dict(spp=2, pipeline_depth=3))]


@pytest.mark.parametrize("name,layout", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_layouts_reuse_the_prefix_exactly(name, layout, tiny_model_dir):
    kvp = layout.get("kvp", 1)
    skip_without_gpus(kvp * layout.get("spp", 1))
    model_dir = tiny_model_dir(MODEL)
    extra = {"max_tokens_per_kvp_group": tokens_per_group(kvp)} if kvp > 1 else {}
    with LLM(
        model=str(model_dir),
        **ENGINE,
        chunk_size=8,
        max_num_batched_tokens=32,
        **layout,
        **extra,
    ) as llm:
        outs = run_workload(llm)
    assert [o.num_cached_tokens for o in outs] == EXPECTED_CACHED
    if kvp > 1:
        assert max(EXPECTED_CACHED) > tokens_per_group(kvp)  # a hit spanning a group boundary
    assert_matches_hf(model_dir, outs, name)
