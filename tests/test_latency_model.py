"""The pure latency model: roofline against hand-computed floors, the fit, the profile store."""

from __future__ import annotations

import random

import pytest

from mnemosyne.latency.composition import GroupLoad, StepComposition
from mnemosyne.latency.fitted import GROUP_FEATURES, ChunkAttentionCost, FittedLatencyModel, fit_latency_model
from mnemosyne.latency.kernel_cost import H200_COST
from mnemosyne.latency.profile_store import (
    LatencyProfile,
    ProfileKey,
    find_cached_profile,
    profiles_dir,
    save_profile,
)
from mnemosyne.latency.roofline import CPU, H200, RooflineLatencyModel, device_spec_for
from mnemosyne.latency.shape import Layout, ModelShape

LLAMA3_8B = ModelShape(num_layers=32, hidden_size=4096, intermediate_size=14336, num_heads=32, num_kv_heads=8,
                       head_dim=128, vocab_size=128256, dtype_bytes=2)  # fmt: skip


def one(load: GroupLoad) -> StepComposition:
    return StepComposition.single(load)


def test_roofline_decode_and_chunk_near_their_floors():
    m = RooflineLatencyModel(LLAMA3_8B, Layout(), H200)
    ctx = 131072
    decode = m.step_time_s(one(GroupLoad().plus_decode(ctx)))
    weights = (32 * LLAMA3_8B.params_per_layer + 128256 * 4096) * 2
    floor = (weights + ctx * 32 * LLAMA3_8B.kv_bytes_per_token_per_layer) / 4.2e12
    assert floor < decode < floor * 1.3
    chunk = m.step_time_s(one(GroupLoad().plus_chunk(8192, 0, sample=True)))
    flops = 2 * 32 * LLAMA3_8B.params_per_layer * 8192
    assert flops / 800e12 < chunk < flops / 800e12 * 1.4


def test_roofline_grows_with_work_and_layout_terms():
    m = RooflineLatencyModel(LLAMA3_8B, Layout(), H200)
    t = [m.step_time_s(one(GroupLoad().plus_chunk(512, p))) for p in (0, 1 << 16, 1 << 18, 1 << 20)]
    assert t == sorted(t) and t[-1] > 4 * t[0]
    spp = RooflineLatencyModel(LLAMA3_8B, Layout(spp=4), H200)
    comp = one(GroupLoad().plus_chunk(512, 1 << 16))
    assert spp.step_time_s(comp) > m.step_time_s(comp)  # stage sends and per-stage overheads
    kvp = RooflineLatencyModel(LLAMA3_8B, Layout(kvp=2), H200)
    two = StepComposition(
        (GroupLoad().plus_chunk(512, 1 << 18, owns=False), GroupLoad().plus_chunk(512, 10)), 512
    )
    assert kvp.step_time_s(two) > kvp.stage_time_s(two.groups[0])  # busiest group + merge
    assert device_spec_for("NVIDIA H200 NVL") is H200 and device_spec_for("cpu") is CPU


def _random_composition(rng: random.Random) -> StepComposition:
    load = GroupLoad()
    for _ in range(rng.randint(0, 8)):
        load = load.plus_decode(rng.randint(1, 50000))
    for _ in range(rng.randint(0 if load.num_tokens else 1, 2)):
        load = load.plus_chunk(rng.choice([32, 128, 512, 2048]), rng.randint(0, 200000), sample=True)
    return one(load)


def test_fit_recovers_a_model_of_its_own_form():
    truth = FittedLatencyModel(Layout(), 190, (2e-3, 1e-6, 2e-5, 1e-9, 4e-12, 5e-12, 1e-4, 2e-9, 0, 1e-5, 3e-5, 0),
                               (0.0, 0.0))  # fmt: skip
    rng = random.Random(0)
    samples = [(c, truth.step_time_s(c)) for c in (_random_composition(rng) for _ in range(300))]
    fitted = fit_latency_model(samples, Layout(), 190)
    for comp, t in samples[:50]:
        assert fitted.step_time_s(comp) == pytest.approx(t, rel=0.02)


def test_profile_store_round_trip_and_lookup(tmp_path):
    key = ProfileKey("cpu", LLAMA3_8B, Layout(tp=2), "float32")
    attention = ChunkAttentionCost(H200_COST, num_layers=32, num_heads=16, head_dim=128, page_tiles=True)
    model = FittedLatencyModel(
        Layout(tp=2), 64, tuple(float(i) for i in range(len(GROUP_FEATURES))), (1.0, 2.0), attention
    )
    profile = LatencyProfile(key, model, {"libraries": {"torch": "x"}})
    assert find_cached_profile(tmp_path, key) is None
    save_profile(profile, profiles_dir(tmp_path) / key.file_name())
    found = find_cached_profile(tmp_path, key)
    assert found is not None and found.model == model and found.info["libraries"] == {"torch": "x"}
    assert find_cached_profile(tmp_path, ProfileKey("cpu", LLAMA3_8B, Layout(tp=4), "float32")) is None
