"""A one-GPU profile used for more stages or KVP groups (`latency/transfer.py`): the model's
terms, and the engine, simulator and planner taking it where the layout differs."""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace
from pathlib import Path

import pytest

from mnemosyne.cli import main
from mnemosyne.engine.args import EngineArgs
from mnemosyne.engine.policies import resolve_latency_model
from mnemosyne.errors import ConfigError
from mnemosyne.latency.composition import GroupLoad, StepComposition
from mnemosyne.latency.fitted import GROUP_FEATURES, STEP_FEATURES, FittedLatencyModel
from mnemosyne.latency.profile_store import LatencyProfile, ProfileKey, profiles_dir, save_profile
from mnemosyne.latency.roofline import CPU, H200, RooflineLatencyModel
from mnemosyne.latency.shape import Layout, ModelShape
from mnemosyne.latency.transfer import TransferredLatencyModel, can_transfer, model_for_layout
from mnemosyne.simulator.planner import plan
from mnemosyne.simulator.setup import load_model_config, simulated_engine_config

CONFIG_1B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
    "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": True,
    "bos_token_id": 128000, "eos_token_id": 128009, "torch_dtype": "bfloat16",
}  # fmt: skip
COEF = {"one": 2e-3, "tokens": 1e-6, "prefix_pairs": 1e-11, "decode_kv_tokens": 1e-9}


def fitted(layout: Layout) -> FittedLatencyModel:
    return FittedLatencyModel(
        layout, 256, tuple(COEF.get(f, 0.0) for f in GROUP_FEATURES), tuple(0.0 for _ in STEP_FEATURES)
    )


@pytest.fixture(scope="module")
def model_1b(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("shapes") / "llama32_1b"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CONFIG_1B))
    return d


def shape_of(model_dir: Path) -> ModelShape:
    return ModelShape.from_model_config(load_model_config(model_dir))


def decode(kv: int) -> GroupLoad:
    return GroupLoad(num_tokens=1, decode_kv_tokens=kv, max_decode_kv_tokens=kv, num_decodes=1, num_sampled=1)


def test_transfer_adds_sends_and_the_merge_to_the_measured_layers(model_1b):
    shape, base = shape_of(model_1b), fitted(Layout())
    assert can_transfer(Layout(), Layout(1, 4, 2)) and not can_transfer(Layout(), Layout())
    assert not can_transfer(Layout(2), Layout(1, 2)) and not can_transfer(Layout(1, 2), Layout(1, 4))
    assert model_for_layout(base, shape, Layout(2, 2), H200) is None  # tp changes the matmuls
    assert model_for_layout(base, shape, Layout(), H200) is base  # its own layout: as measured

    spp2 = model_for_layout(base, shape, Layout(1, 2), H200)
    chunk = StepComposition((GroupLoad(num_tokens=512, chunk_prefix_pairs=512 * 4096, num_chunks=1),))
    roof = RooflineLatencyModel(shape, Layout(1, 2), H200)
    assert isinstance(spp2, TransferredLatencyModel) and spp2.layout == Layout(1, 2)
    assert spp2.step_time_s(chunk) == pytest.approx(base.step_time_s(chunk) + roof.send_time_s(512))

    kvp2 = model_for_layout(base, shape, Layout(1, 1, 2), H200)
    assert kvp2 is not None
    shared = StepComposition((decode(100_000), decode(30_000)), num_shared_tokens=1)
    merge = RooflineLatencyModel(shape, Layout(1, 1, 2), H200).merge_time_s(1)
    assert merge > 0
    # the busiest group's decode (as measured) plus the all-gather of every layer
    assert kvp2.step_time_s(shared) == pytest.approx(
        base.step_time_s(StepComposition((decode(100_000),))) + merge
    )


def test_engine_takes_a_one_gpu_profile_for_spp_and_kvp(model_1b, tmp_path):
    shape = shape_of(model_1b)
    path = tmp_path / "profile.json"
    save_profile(LatencyProfile(ProfileKey("cpu", shape, Layout(), "bfloat16"), fitted(Layout()), {}), path)

    def config(layout: Layout, profile: Path | None):
        args = EngineArgs(model=str(model_1b), spp=layout.spp, kvp=layout.kvp, tp=layout.tp,
                          latency_profile=str(profile) if profile else None, kv_cache_memory_gb=1.0)  # fmt: skip
        return replace(simulated_engine_config(model_1b, args, CPU), device="cpu")

    model, source = resolve_latency_model(config(Layout(1, 2, 2), path), tmp_path)
    assert isinstance(model, TransferredLatencyModel) and "measured at" in source
    with pytest.raises(ConfigError, match="transfers only"):
        resolve_latency_model(config(Layout(2, 1, 1), path), tmp_path)
    # no explicit profile: a cached one of the same tp without spp / kvp is transferred
    cache = tmp_path / "cache"
    key = ProfileKey("cpu", shape, Layout(), "bfloat16")
    save_profile(LatencyProfile(key, fitted(Layout()), {}), profiles_dir(cache) / key.file_name())
    model, source = resolve_latency_model(config(Layout(1, 2), None), cache)
    assert isinstance(model, TransferredLatencyModel) and source.startswith("cached profile")
    model, source = resolve_latency_model(config(Layout(2), None), cache)
    assert isinstance(model, RooflineLatencyModel) and source == "roofline"


def test_simulate_and_plan_with_a_one_gpu_profile(model_1b, tmp_path):
    key = ProfileKey("NVIDIA H200", shape_of(model_1b), Layout(), "bfloat16")
    path = tmp_path / "profile.json"
    save_profile(LatencyProfile(key, fitted(Layout()), {}), path)
    trace = tmp_path / "trace.jsonl"
    trace.write_text(json.dumps({"arrival_s": 0.0, "prompt_len": 20000, "output_len": 4}) + "\n")
    ttft = {}
    for spp in (1, 2):
        out = tmp_path / f"spp{spp}.json"
        assert main(["simulate", "--model", str(model_1b), "--trace", str(trace), "--out", str(out),
                     "--spp", str(spp), "--chunk-size", "2048", "--latency-profile", str(path)]) == 0  # fmt: skip
        ttft[spp] = json.loads(out.read_text())["summary"]["ttft_s"]["p50"]
    assert ttft[2] < 0.75 * ttft[1]  # two stages overlap the chunks

    result = plan(
        load_model_config(model_1b), 4, 65536, H200, 0.03, profiles=[LatencyProfile(key, fitted(Layout()), {})]
    )
    sources = {(p["tp"], p["spp"], p["kvp"]): p["latency_model"] for p in result["layouts"]}
    assert sources[(1, 1, 1)] == "profile" and sources[(1, 2, 2)] == "profile (transferred)"
    assert sources[(2, 1, 1)] == "roofline"
    # A tp2 profile too (`--latency-profile` repeated): the tp2 layouts take it, tp1 keeps its own.
    key2 = replace(key, layout=Layout(2))
    path2 = tmp_path / "profile_tp2.json"
    save_profile(LatencyProfile(key2, fitted(Layout(2)), {}), path2)
    out = tmp_path / "plan.json"
    args = ["--num-gpus", "4", "--context-len", "65536", "--format", "json"]
    with open(out, "w") as f, contextlib.redirect_stdout(f):
        assert main(["plan", "--model", str(model_1b), *args, "--latency-profile", str(path),
                     "--latency-profile", str(path2)]) == 0  # fmt: skip
    result = json.loads(out.read_text())
    sources = {(p["tp"], p["spp"], p["kvp"]): p["latency_model"] for p in result["layouts"]}
    assert sources[(1, 1, 1)] == sources[(2, 1, 1)] == "profile"
    assert sources[(2, 2, 1)] == sources[(1, 2, 2)] == "profile (transferred)"
    assert result["latency_model"].count("profile measured at") == 2
