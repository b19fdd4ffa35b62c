"""Adaptive chunks in LARS order are exact (vs HF, one process; vs one process, spp2 x kvp2), and
`mnemosyne profile --device cpu` writes a profile that the engine then picks up from the cache."""

from __future__ import annotations

import json

import torch
from test_exactness import check_against_hf
from test_parallel import ENGINE, GREEDY, assert_same, make_prompts, reference, run, tokens_per_group

from mnemosyne import LLM
from mnemosyne.cli import main
from mnemosyne.config import ModelConfig
from mnemosyne.latency.fitted import GROUP_FEATURES, FittedLatencyModel
from mnemosyne.latency.profile_store import LatencyProfile, ProfileKey, save_profile
from mnemosyne.latency.shape import Layout, ModelShape

# 1 ms per step + 0.1 ms per token + 2 us per (query, prefix key) pair: with a 4 ms target a chunk
# starts near 24 tokens and shrinks as its prefix grows.
_COEFFICIENTS_S = dict.fromkeys(GROUP_FEATURES, 0.0) | {"one": 1e-3, "tokens": 1e-4, "prefix_pairs": 2e-6}
POLICY = dict(chunk_policy="adaptive", scheduling_policy="lars", tbt_slo_ms=4.0, chunk_granularity=4,
              min_chunk_tokens=4)  # fmt: skip


def write_profile(path, model_dir, layout: Layout) -> str:
    shape = ModelShape.from_model_config(ModelConfig.from_pretrained(model_dir, torch.float32))
    model = FittedLatencyModel(layout, 1, tuple(_COEFFICIENTS_S[f] for f in GROUP_FEATURES), (1e-5, 0.0))
    save_profile(LatencyProfile(ProfileKey("cpu", shape, layout, "float32"), model, {}), path)
    return str(path)


def chunk_sizes(llm: LLM) -> set[int]:
    return {n for s in llm.engine.take_step_stats() for n in s.chunk_sizes}


def test_adaptive_lars_matches_hf(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("llama")
    profile = write_profile(tmp_path / "p.json", model_dir, Layout())
    check_against_hf(
        "llama", model_dir, **POLICY, latency_profile=profile, max_num_batched_tokens=64, block_size=4
    )


def test_adaptive_lars_layout_matches_single_process(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("llama")
    ref = reference("llama", model_dir)
    layout = dict(spp=2, kvp=2, pipeline_depth=3, max_tokens_per_kvp_group=tokens_per_group(2))
    profile = write_profile(tmp_path / "p.json", model_dir, Layout(spp=2, kvp=2))
    engine = dict(ENGINE, max_num_batched_tokens=64)
    with LLM(model=str(model_dir), **engine, **layout, **POLICY, latency_profile=profile) as llm:
        assert llm.engine.policies.latency_source == profile
        stats = run(llm, make_prompts(), GREEDY)
        sizes = chunk_sizes(llm)
    assert_same(ref, stats.outputs, "adaptive lars spp2xkvp2")
    assert len(sizes) >= 3 and stats.max_groups == 2


def test_cpu_profile_is_cached_and_used(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MNEMOSYNE_CACHE_DIR", str(tmp_path / "cache"))
    model_dir = tiny_model_dir("llama")
    out = tmp_path / "profile.json"
    args = ["profile", "--model", str(model_dir), "--device", "cpu", "--dtype", "float32", "--grid", "tiny"]
    assert main([*args, "--kv-cache-memory-gb", "0.002", "--block-size", "4", "--out", str(out)]) == 0
    body = json.loads(out.read_text())
    assert body["key"]["device_name"] == "cpu" and body["key"]["layout"] == {"tp": 1, "spp": 1, "kvp": 1}
    assert body["samples"] and "torch" in body["libraries"]
    with LLM(model=str(model_dir), dtype="float32", device="cpu", kv_cache_memory_gb=0.002, block_size=4,
             chunk_policy="adaptive") as llm:  # fmt: skip
        assert llm.engine.policies.latency_source.startswith("cached profile")
        outs = llm.generate([list(range(3, 40))], GREEDY)
        assert len(outs[0].token_ids) == GREEDY.max_tokens


def test_graph_sized_steps_match_hf(tiny_model_dir, tmp_path, monkeypatch):
    """Adaptive chunks capped at a (forced, small) graph size while requests decode stay exact;
    every step that carried a decode held at most that many tokens, and some also a prefill."""
    from mnemosyne.engine import args as engine_args
    from mnemosyne.engine.adaptive_chunking import AdaptiveChunkPolicy

    cap = 12
    monkeypatch.setattr(engine_args, "max_decoding_step_tokens", lambda *a, **k: cap)  # CPU has no graphs
    steps: list[tuple[int, int, bool]] = []  # (decoding, tokens, any prefill) of every finished step
    begin = AdaptiveChunkPolicy.begin_step

    def recording_begin(self, now: float, num_decoding: int) -> None:
        steps.append((self._num_decoding, self._num_tokens, self._any_prefill))
        begin(self, now, num_decoding)

    monkeypatch.setattr(AdaptiveChunkPolicy, "begin_step", recording_begin)
    model_dir = tiny_model_dir("llama")
    profile = write_profile(tmp_path / "p.json", model_dir, Layout())
    check_against_hf(
        "llama", model_dir, **POLICY, latency_profile=profile, max_num_batched_tokens=64, block_size=4
    )
    decoding = [(n, prefill) for d, n, prefill in steps if d]
    assert decoding and max(n for n, _ in decoding) <= cap
    assert any(prefill for _, prefill in decoding)
