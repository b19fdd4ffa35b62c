"""The fitted model's kernel term (kernel_chunk_key_s) and the profile formats it is read from.
Fake data only: compositions built here, times from a known model, no device."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest

from mnemosyne.errors import ConfigError
from mnemosyne.latency.composition import GroupLoad, StepComposition
from mnemosyne.latency.fitted import (
    GROUP_FEATURES,
    STEP_FEATURES,
    ChunkAttentionCost,
    FittedLatencyModel,
    fit_latency_model,
)
from mnemosyne.latency.kernel_cost import H200_COST, ChunkCostModel, ChunkPath, PathCost
from mnemosyne.latency.profile_store import LatencyProfile, ProfileKey, load_profile, save_profile
from mnemosyne.latency.shape import Layout, ModelShape

SHAPE = ModelShape(num_layers=4, hidden_size=256, intermediate_size=512, num_heads=8, num_kv_heads=2,
                   head_dim=32, vocab_size=1000, dtype_bytes=2)  # fmt: skip
# Two made-up paths: "triton" cheap per key for small chunks, "cudnn" cheaper for long ones.
COST = ChunkCostModel(
    triton=PathCost(chunks=(16, 512), fixed_s=(1e-5, 1e-4), per_key_s=(1e-9, 4e-8)),
    cudnn=PathCost(chunks=(16, 512), fixed_s=(1e-3, 1e-3), per_key_s=(1e-8, 1e-8)),
    num_heads=8, head_dim=32, source="test",
)  # fmt: skip
ATTENTION = ChunkAttentionCost(COST, num_layers=4, num_heads=8, head_dim=32, page_tiles=False)
NAMES = GROUP_FEATURES


def coefficients(**kw: float) -> tuple[float, ...]:
    return tuple(kw.get(name, 0.0) for name in NAMES)


def random_composition(rng: random.Random) -> StepComposition:
    load = GroupLoad()
    for _ in range(rng.randint(0, 6)):
        load = load.plus_decode(rng.randint(1, 50000))
    for _ in range(rng.randint(0 if load.num_tokens else 1, 2)):
        load = load.plus_chunk(rng.choice([16, 64, 256, 512, 2048]), rng.randint(0, 300000), sample=True)
    return StepComposition.single(load)


def test_key_seconds_take_the_lower_per_key_cost_of_the_two_paths():
    small = GroupLoad().plus_chunk(16, 100000)  # triton: 1e-9 per key, cudnn 1e-8
    assert ATTENTION.key_seconds(small) == pytest.approx(4 * (100000 + 16) * 1e-9)
    big = GroupLoad().plus_chunk(512, 200000)  # triton 4e-8 per key, cudnn 1e-8
    assert COST.cheaper(512, 200512, 8, 32) is ChunkPath.CUDNN
    assert ATTENTION.key_seconds(big) == pytest.approx(4 * 200512 * 1e-8)
    # Few keys: the backend keeps Triton (cuDNN's 1 ms floor), the feature still takes cuDNN's
    # lower per-key cost (the fixed costs are the fit's `chunks` and `one` terms).
    assert COST.cheaper(512, 1000, 8, 32) is ChunkPath.TRITON_SPLITKV
    assert ATTENTION.key_seconds(GroupLoad().plus_chunk(512, 488)) == pytest.approx(4 * 1000 * 1e-8)
    not_owned = GroupLoad().plus_chunk(16, 1000, owns=False)  # keys = prefix only
    assert ATTENTION.key_seconds(not_owned) == pytest.approx(4 * 1000 * 1e-9)
    assert ATTENTION.key_seconds(GroupLoad().plus_decode(5000)) == 0.0  # decodes have their own terms


def test_key_seconds_never_fall_as_a_chunk_or_its_prefix_grows():
    """The chunk-size binary search needs step times non-decreasing in the chunk size."""
    attention = ChunkAttentionCost(H200_COST, num_layers=32, num_heads=32, head_dim=128, page_tiles=True)
    for page_tiles in (True, False):
        a = dataclasses.replace(attention, page_tiles=page_tiles)
        for prefix in (0, 1000, 30000, 262144, 900000):
            t = [a.key_seconds(GroupLoad().plus_chunk(c, prefix)) for c in range(16, 8193, 16)]
            assert all(x <= y for x, y in zip(t, t[1:], strict=False)), (page_tiles, prefix)
        for c in (16, 300, 4096):
            t = [a.key_seconds(GroupLoad().plus_chunk(c, p)) for p in range(0, 10**6, 50000)]
            assert all(x <= y for x, y in zip(t, t[1:], strict=False)), (page_tiles, c)


def test_fit_recovers_the_kernel_coefficient_and_the_rest():
    truth = FittedLatencyModel(
        Layout(), 190, coefficients(one=2e-3, tokens=1e-6, tokens_past_knee=2e-5, chunks=1e-4,
                                    decode_kv_tokens=2e-9, decodes=1e-5, kernel_chunk_key_s=0.9),
        (0.0, 0.0), ATTENTION,
    )  # fmt: skip
    rng = random.Random(1)
    samples = [(c, truth.step_time_s(c)) for c in (random_composition(rng) for _ in range(300))]
    fitted = fit_latency_model(samples, Layout(), 190, chunk_attention=ATTENTION)
    got = dict(zip(NAMES, fitted.group_coefficients_s, strict=True))
    assert got["kernel_chunk_key_s"] == pytest.approx(0.9, rel=0.05)
    for comp, t in samples[:50]:
        assert fitted.step_time_s(comp) == pytest.approx(t, rel=0.02)
    # Without the table the term cannot be fitted: it stays 0, and so does an excluded feature.
    plain = fit_latency_model(samples, Layout(), 190, excluded=frozenset({"chunks"}))
    assert dict(zip(NAMES, plain.group_coefficients_s, strict=True))["kernel_chunk_key_s"] == 0.0
    assert dict(zip(NAMES, plain.group_coefficients_s, strict=True))["chunks"] == 0.0
    with pytest.raises(ValueError, match="unknown features"):
        fit_latency_model(samples, Layout(), 190, excluded=frozenset({"nope"}))


def _profile(model: FittedLatencyModel) -> LatencyProfile:
    return LatencyProfile(ProfileKey("gpu", SHAPE, Layout(), "bfloat16"), model, {"samples": []})


def test_format_2_round_trip_and_format_1_still_read(tmp_path):
    model = FittedLatencyModel(Layout(), 64, coefficients(one=1e-3, kernel_chunk_key_s=1.1), (0.0, 0.0), ATTENTION)
    path = tmp_path / "p2.json"
    save_profile(_profile(model), path)
    assert json.loads(path.read_text())["format"] == 2
    assert load_profile(path).model == model

    # A format-1 file (written before the kernel term): no such feature, no table; same predictions.
    old = FittedLatencyModel(Layout(), 64, coefficients(one=1e-3, prefix_pairs=1e-10), (0.0, 0.0))
    body = json.loads(_profile(old).to_json())
    body["format"] = 1
    del body["model"]["group_features"]["kernel_chunk_key_s"]
    assert "chunk_attention" not in body["model"]
    path1 = tmp_path / "p1.json"
    path1.write_text(json.dumps(body))
    loaded = load_profile(path1).model
    comp = StepComposition.single(GroupLoad().plus_chunk(512, 10000).plus_decode(300))
    assert loaded.step_time_s(comp) == old.step_time_s(comp)


def test_unreadable_profiles_say_why(tmp_path):
    model = FittedLatencyModel(Layout(), 64, coefficients(one=1e-3), tuple(0.0 for _ in STEP_FEATURES), ATTENTION)
    body = json.loads(_profile(model).to_json())
    cases = {
        "format 3": lambda b: b.update(format=3),
        "unknown latency-model features": lambda b: b["model"]["group_features"].update(new_term=1.0),
        "no chunk_attention cost table": lambda b: (b["model"].pop("chunk_attention"),
                                                    b["model"]["group_features"].update(kernel_chunk_key_s=1.0)),
        "group features": lambda b: b["model"]["group_features"].pop("tokens"),
    }  # fmt: skip
    for message, edit in cases.items():
        b = json.loads(json.dumps(body))
        edit(b)
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(b))
        with pytest.raises(ConfigError, match=message):
            load_profile(path)


def test_profiler_cost_table_per_gpu_heads_and_page_tiles():
    from mnemosyne.profiling.profiler import chunk_attention_cost

    tiles = chunk_attention_cost(SHAPE, Layout(tp=2), block_size=64)
    assert (tiles.num_layers, tiles.num_heads, tiles.head_dim, tiles.page_tiles) == (4, 4, 32, True)
    assert not chunk_attention_cost(SHAPE, Layout(), block_size=16).page_tiles
    assert tiles.tile_tokens == SHAPE.chunk_tile_tokens == 32  # 4 query heads per KV head, 16-bit


def test_chunk_tiles_of_the_kernels():
    from mnemosyne.kernels.host_math import chunk_tile_tokens, padded_chunk_tokens

    # 128 rows (16-bit) or 32 (float32) of tokens x query heads per KV head
    assert [chunk_tile_tokens(g, 2) for g in (1, 4, 7, 8, 256)] == [128, 32, 18, 16, 1]
    assert [chunk_tile_tokens(g, 4) for g in (1, 4, 8)] == [32, 8, 4]
    # one half-height tile up to half a tile, else whole tiles
    assert [padded_chunk_tokens(c, 32) for c in (1, 16, 17, 32, 33, 48, 64, 65, 300)] == [
        16, 16, 32, 32, 64, 64, 64, 96, 320,
    ]  # fmt: skip
    assert [padded_chunk_tokens(c, 1) for c in (1, 2, 300)] == [1, 2, 300]  # no tiles


def test_chunks_cost_whole_query_tiles():
    """A 48-token chunk costs what a 64-token one does in the attention terms (each row of a
    tile runs its key loop; measured on an H200), while the dense layers see 48 tokens."""
    tiled = dataclasses.replace(ATTENTION, tile_tokens=32)
    attention_only = coefficients(prefix_pairs=1e-10, kernel_chunk_key_s=1.0)
    model = FittedLatencyModel(Layout(), 64, attention_only, (0.0, 0.0), tiled)
    plain = FittedLatencyModel(Layout(), 64, attention_only, (0.0, 0.0), ATTENTION)

    def step(m: FittedLatencyModel, c: int, prefix: int = 240000) -> float:
        return m.step_time_s(StepComposition.single(GroupLoad().plus_chunk(c, prefix)))

    assert step(model, 48) == pytest.approx(step(model, 64), rel=1e-3)
    assert step(model, 80) == pytest.approx(step(model, 96), rel=1e-3)
    for c in (16, 32, 64, 96, 512):  # whole tiles (or a half tile): unchanged
        assert step(model, c) == pytest.approx(step(plain, c), rel=1e-12)
    assert step(model, 48) > 1.2 * step(plain, 48)
    t = [step(model, c) for c in range(1, 600)]
    assert all(x <= y for x, y in zip(t, t[1:], strict=False))  # the binary search's premise
    dense = coefficients(tokens=1e-6)  # the dense layers: the chunk's own tokens
    assert step(FittedLatencyModel(Layout(), 64, dense, (0.0, 0.0), tiled), 48) == pytest.approx(48e-6)


def test_profiles_without_a_tile_take_their_shapes(tmp_path):
    model = FittedLatencyModel(Layout(), 64, coefficients(one=1e-3, kernel_chunk_key_s=1.1), (0.0, 0.0), ATTENTION)
    body = json.loads(_profile(model).to_json())
    assert body["model"]["chunk_attention"]["tile_tokens"] == 1
    del body["model"]["chunk_attention"]["tile_tokens"]  # a profile written before tiles
    path = tmp_path / "old.json"
    path.write_text(json.dumps(body))
    assert load_profile(path).model.chunk_attention.tile_tokens == SHAPE.chunk_tile_tokens
