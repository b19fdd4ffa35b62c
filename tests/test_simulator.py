"""`mnemosyne simulate` and `mnemosyne plan` on CPU, from config.json files alone.

  * simulate is deterministic (same trace, same bytes) and a trace runs through 2x2 layouts
    with requests spanning KVP groups;
  * stage events: spp micro-batches overlap, results come back in order;
  * plan gives every field on the Llama-3-8B shape (1M tokens, 8 GPUs) and the
    Llama-3.2-1B shape (10M tokens, 4 GPUs).
The schedule-equals-the-real-engine check (worker processes) is in test_simulator_replay.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mnemosyne.cli import main
from mnemosyne.engine.args import EngineArgs
from mnemosyne.errors import ConfigError
from mnemosyne.latency.fitted import GROUP_FEATURES, STEP_FEATURES, FittedLatencyModel
from mnemosyne.latency.profile_store import LatencyProfile, ProfileKey, save_profile
from mnemosyne.latency.shape import Layout, ModelShape
from mnemosyne.simulator.engine import SimulatedEngine, run_trace
from mnemosyne.simulator.pipeline import StagePipeline
from mnemosyne.simulator.planner import plan_layout
from mnemosyne.simulator.setup import (
    device_spec,
    latency_model_for,
    load_model_config,
    simulated_engine_config,
)
from mnemosyne.simulator.trace import TraceRequest, load_trace

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
    "bos_token_id": 128000, "eos_token_id": 128009, "torch_dtype": "bfloat16",
}  # fmt: skip
LLAMA32_1B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
    "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": True,
    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "bos_token_id": 128000, "eos_token_id": 128009, "torch_dtype": "bfloat16",
}  # fmt: skip
PLAN_FIELDS = {
    "tp",
    "spp",
    "kvp",
    "max_tokens_per_kvp_group",
    "fits",
    "kv_gib_per_gpu",
    "ttft_s",
    "tbt_s",
    "meets_slo",
}


def write_config(root: Path, name: str, cfg: dict) -> Path:
    d = root / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def write_trace(path: Path) -> Path:
    lines = [
        {"arrival_s": 0.0, "prompt_len": 3000, "output_len": 20},
        {"arrival_s": 0.01, "prompt_len": 700, "output_len": 40},
        {"arrival_s": 0.02, "prompt_len": 12000, "output_len": 8},  # spans both KVP groups of 8192
        {"arrival_s": 0.3, "prompt_len": 100, "output_len": 30},
        {"arrival_s": 0.3, "prompt_len": 5000, "output_len": 5},
        {"arrival_s": 2.0, "prompt_len": 64, "output_len": 3},  # after an idle gap
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


@pytest.fixture(scope="module")
def model_1b(tmp_path_factory) -> Path:
    return write_config(tmp_path_factory.mktemp("shapes"), "llama32_1b", LLAMA32_1B)


def simulate(model: Path, trace: Path, out: Path, *extra: str) -> dict:
    rc = main(["simulate", "--model", str(model), "--trace", str(trace), "--out", str(out), *extra])
    assert rc == 0
    return json.loads(out.read_text())


LAYOUT_2X2 = ("--tp", "2", "--kvp", "2", "--spp", "2", "--max-tokens-per-kvp-group", "8192")
POLICY = ("--chunk-policy", "adaptive", "--scheduling-policy", "lars", "--tbt-slo-ms", "20")


def test_simulate_plot_without_matplotlib_is_a_clear_error(model_1b, tmp_path, monkeypatch, capsys):
    """--plot names the missing package before the simulation runs, and writes nothing."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a)
    )
    trace = write_trace(tmp_path / "trace.jsonl")
    rc = main(["simulate", "--model", str(model_1b), "--trace", str(trace), "--out", str(tmp_path / "a.json"),
               "--plot", str(tmp_path / "a.png")])  # fmt: skip
    assert rc == 2 and "--plot needs matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "a.json").exists()


def test_simulate_is_deterministic_and_runs_2x2(model_1b, tmp_path):
    trace = write_trace(tmp_path / "trace.jsonl")
    a = simulate(
        model_1b, trace, tmp_path / "a.json", *LAYOUT_2X2, *POLICY, "--plot", str(tmp_path / "a.png")
    )
    b = simulate(model_1b, trace, tmp_path / "b.json", *LAYOUT_2X2, *POLICY)
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()
    assert (tmp_path / "a.png").stat().st_size > 0
    assert a["setup"]["simulated"] and a["setup"]["layout"]["kvp"] == 2
    rows = a["requests"]
    assert len(rows) == 6 and b["summary"]["num_requests"] == 6
    for row in rows:
        assert set(row) >= {"id", "arrival_s", "ttft_s", "tbt_p50_s", "tbt_max_s", "e2e_s"}
        assert 0 < row["ttft_s"] <= row["e2e_s"]
    assert rows[5]["arrival_s"] == 2.0 and rows[5]["ttft_s"] < 0.5  # the idle gap was skipped
    s = a["summary"]
    assert s["num_steps"] > 0 and s["throughput"]["output_tokens_per_s"] > 0
    assert s["ttft_s"]["p50"] <= s["ttft_s"]["p99"] <= s["ttft_s"]["max"]
    assert 0 <= s["slo"]["attainment"] <= 1


def test_layouts_change_the_prediction(model_1b, tmp_path):
    """Longer prompts take longer; more stages bring the long prefill's TTFT down."""
    trace = tmp_path / "t.jsonl"
    trace.write_text(json.dumps({"arrival_s": 0.0, "prompt_len": 60000, "output_len": 2}) + "\n")
    one = simulate(model_1b, trace, tmp_path / "1.json", "--chunk-size", "2048")
    spp4 = simulate(model_1b, trace, tmp_path / "4.json", "--chunk-size", "2048", "--spp", "4")
    assert spp4["requests"][0]["ttft_s"] < 0.5 * one["requests"][0]["ttft_s"]


def test_stage_pipeline_overlaps_micro_batches():
    pipe = StagePipeline(2)
    assert pipe.submit(0.0, 2.0) == 2.0  # stage 0: [0, 1), stage 1: [1, 2)
    assert pipe.submit(0.0, 2.0) == 3.0  # enters stage 0 at 1, stage 1 at 2
    assert pipe.submit(5.0, 4.0) == 9.0  # an idle pipeline: the whole step time


def test_bad_trace_names_the_line(model_1b, tmp_path, capsys):
    trace = tmp_path / "bad.jsonl"
    trace.write_text(
        '{"arrival_s": 0, "prompt_len": 5, "output_len": 1}\n{"arrival_s": 1, "prompt_len": 5}\n'
    )
    rc = main(
        ["simulate", "--model", str(model_1b), "--trace", str(trace), "--out", str(tmp_path / "o.json")]
    )
    assert rc == 2 and "bad.jsonl:2" in capsys.readouterr().err


def test_trace_takes_bench_serve_dataset_lines(tmp_path):
    """A `bench serve` dataset line (benchmarks/serving_trace.py --dry-run) gives its prompt's length."""
    trace = tmp_path / "t.jsonl"
    trace.write_text(
        '{"prompt": [5, 6, 7], "output_len": 4, "arrival_s": 0.5, "kind": "short"}\n'
        '{"arrival_s": 1, "prompt_len": 9, "output_len": 2}\n'
    )
    assert load_trace(trace) == [TraceRequest(0.5, 3, 4), TraceRequest(1.0, 9, 2)]
    for i, bad in enumerate(
        ('{"arrival_s": 0, "prompt": "text", "output_len": 1}', '{"arrival_s": 0, "output_len": 1}')
    ):
        path = tmp_path / f"bad{i}.jsonl"
        path.write_text(bad + "\n")
        with pytest.raises(ConfigError, match=f"bad{i}.jsonl:1"):
            load_trace(path)


def plan_json(model: Path, *args: str, capsys) -> dict:
    assert main(["plan", "--model", str(model), "--format", "json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_llama3_8b_1m_on_8_gpus(tmp_path, capsys):
    model = write_config(tmp_path, "llama3_8b", LLAMA3_8B)
    result = plan_json(model, "--num-gpus", "8", "--context-len", "1000000", capsys=capsys)
    layouts = result["layouts"]
    assert all(PLAN_FIELDS <= set(p) for p in layouts)
    assert all(p["tp"] * p["spp"] * p["kvp"] <= 8 and p["tp"] in (1, 2, 4, 8) for p in layouts)
    by = {(p["tp"], p["spp"], p["kvp"]): p for p in layouts}
    # 1M tokens x 128 KiB (bf16, 32 layers x 8 KV heads x 128) = 122 GiB: not with the weights on one H200
    assert not by[1, 1, 1]["fits"] and by[1, 1, 1]["kv_gib_per_gpu"] == pytest.approx(1e6 * 131072 / 2**30)
    assert by[1, 1, 8]["max_tokens_per_kvp_group"] == 125056  # 1M / 8 rounded up to blocks of 64
    assert by[8, 1, 1]["kv_gib_per_gpu"] == pytest.approx(1e6 * 131072 / 8 / 2**30)
    assert by[1, 1, 8]["tbt_s"] < by[1, 1, 1]["tbt_s"]  # KVP splits the decode's KV reads
    assert by[1, 8, 1]["ttft_s"] < by[1, 1, 1]["ttft_s"]  # SPP pipelines the prefill
    best = result["best"]
    assert best["meets_slo"] and best["reason"] and PLAN_FIELDS <= set(best)
    assert main(["plan", "--model", str(model), "--num-gpus", "8", "--context-len", "1000000"]) == 0
    assert "best: tp=" in capsys.readouterr().out


def test_plan_llama32_1b_10m_on_4_gpus(model_1b, capsys):
    result = plan_json(model_1b, "--num-gpus", "4", "--context-len", "10000000", capsys=capsys)
    assert result["gpu"] == "NVIDIA H200"
    by = {(p["tp"], p["spp"], p["kvp"]): p for p in result["layouts"]}
    # 10M x 32 KiB = 305 GiB of KV: it fits only spread over all 4 GPUs (76 GiB each)
    assert all(PLAN_FIELDS <= set(p) for p in result["layouts"])
    assert not by[1, 1, 1]["fits"] and not by[1, 1, 2]["fits"] and not by[2, 1, 1]["fits"]
    assert by[1, 1, 4]["fits"] and by[1, 1, 4]["max_tokens_per_kvp_group"] == 2500032  # blocks of 64
    assert by[1, 2, 2]["fits"] and by[4, 1, 1]["fits"]
    assert result["best"]["num_gpus"] == 4 and result["best"]["reason"]
    h100 = plan_json(model_1b, "--num-gpus", "4", "--context-len", "10000000", "--gpu", "h100", capsys=capsys)
    assert h100["gpu"] == "NVIDIA H100" and not any(
        p["fits"] for p in h100["layouts"]
    )  # 76 GiB > 80 GB x 0.9
    assert "tp" not in h100["best"] and "no layout fits" in h100["best"]["reason"]


@pytest.mark.parametrize("layout", [(1, 1, 1), (2, 2, 2), (1, 4, 1)])
@pytest.mark.parametrize("prefill_only_step_ms,rel", [(20, 0.02), (250, 0.08)])
def test_plan_ttft_matches_simulating_the_prompt(model_1b, layout, prefill_only_step_ms, rel):
    """The planner's closed form (prefill table / spp + pipeline fill) against the real scheduler
    with adaptive chunks running the L-token prompt alone: within 2% with many small chunks
    (a 20 ms target), 8% with ~13 large ones (250 ms: the pipeline's discrete fill and drain).
    Online calibration off, as the planner has none: the simulated device is the model itself,
    and a pipeline's result gaps put 1-2% on some micro-batches (a neighbour's chunk of another
    size), whose quantile the calibration would take (3.9% more TTFT at spp4)."""
    tp, spp, kvp = layout
    context_len, spec = 100_000, device_spec("h200")
    planned = plan_layout(load_model_config(model_1b), Layout(tp, spp, kvp), context_len, spec, 0.02, None,
                          prefill_only_step_s=prefill_only_step_ms / 1e3)  # fmt: skip
    args = EngineArgs(
        model=str(model_1b), tp=tp, spp=spp, kvp=kvp, max_model_len=context_len,
        max_tokens_per_kvp_group=planned.max_tokens_per_kvp_group if kvp > 1 else None,
        chunk_policy="adaptive", tbt_slo_ms=20, prefill_only_step_ms=prefill_only_step_ms,
        max_num_batched_tokens=8192, enable_prefix_caching=False, online_calibration=False,
    )  # fmt: skip
    config = simulated_engine_config(model_1b, args, spec)
    engine = SimulatedEngine(config, *latency_model_for(config, spec))
    run_trace(engine, [TraceRequest(0.0, context_len - 2, 2)])
    simulated_ttft = engine.requests["req-0"].token_times_s[0]
    assert planned.ttft_s == pytest.approx(simulated_ttft, rel=rel)


def test_simulate_with_a_measured_profile(model_1b, tmp_path, capsys):
    layout = Layout(1, 2, 1)
    coef = {"one": 2e-3, "tokens": 1e-6, "prefix_pairs": 1e-11, "decode_kv_tokens": 1e-9}
    model = FittedLatencyModel(
        layout, 256, tuple(coef.get(f, 0.0) for f in GROUP_FEATURES), tuple(0.0 for _ in STEP_FEATURES)
    )
    key = ProfileKey(
        "NVIDIA H200", ModelShape.from_model_config(load_model_config(model_1b)), layout, "bfloat16"
    )
    path = tmp_path / "profile.json"
    save_profile(LatencyProfile(key, model, {}), path)
    trace = write_trace(tmp_path / "trace.jsonl")
    out = simulate(model_1b, trace, tmp_path / "p.json", "--spp", "2", "--latency-profile", str(path))
    assert out["setup"]["latency_model"] == str(path)
    # one decode alone: 2 ms + 1 us + its keys at 1 ns: the last request's gaps
    assert out["requests"][5]["tbt_max_s"] == pytest.approx(2e-3 + 1e-6 + 65e-9, rel=0.05)
    rc = main(["simulate", "--model", str(model_1b), "--trace", str(trace), "--out", str(tmp_path / "q.json"),
               "--latency-profile", str(path)])  # fmt: skip
    assert rc == 2 and "measured for" in capsys.readouterr().err


def write_fake_profile(
    path: Path, model_dir: Path, layout: Layout, scale: float, token_s: float = 1e-6
) -> Path:
    """A profile of `layout` whose steps take `scale` x (2 ms + token_s per token + 1 ns per decode key)."""
    coef = {"one": 2e-3 * scale, "tokens": token_s * scale, "decode_kv_tokens": 1e-9 * scale}
    model = FittedLatencyModel(
        layout, 256, tuple(coef.get(f, 0.0) for f in GROUP_FEATURES), tuple(0.0 for _ in STEP_FEATURES)
    )
    key = ProfileKey(
        "NVIDIA H200", ModelShape.from_model_config(load_model_config(model_dir)), layout, "bfloat16"
    )
    save_profile(LatencyProfile(key, model, {}), path)
    return path


def test_device_profile_times_the_steps_the_engine_profile_predicts(model_1b, tmp_path, capsys):
    """--device-latency-profile: the simulated device takes the device profile's times (here
    3x the engine's profile), while the engine's own profile is what its policies see."""
    engine_p = write_fake_profile(tmp_path / "engine.json", model_1b, Layout(1, 1, 1), 1.0)
    device_p = write_fake_profile(tmp_path / "device.json", model_1b, Layout(1, 1, 1), 3.0)
    trace = write_trace(tmp_path / "trace.jsonl")
    out = simulate(model_1b, trace, tmp_path / "d.json", "--latency-profile", str(engine_p),
                   "--device-latency-profile", str(device_p))  # fmt: skip
    assert out["setup"]["latency_model"] == str(engine_p)
    assert out["setup"]["device_latency_model"] == str(device_p)
    # the last request decodes alone: 3 x (2 ms + 1 us + 65 keys at 1 ns)
    assert out["requests"][5]["tbt_max_s"] == pytest.approx(3 * (2e-3 + 1e-6 + 65e-9), rel=0.05)
    same = simulate(model_1b, trace, tmp_path / "e.json", "--latency-profile", str(engine_p))
    assert same["setup"]["device_latency_model"] == str(engine_p)
    assert same["requests"][5]["tbt_max_s"] == pytest.approx(2e-3 + 1e-6 + 65e-9, rel=0.05)
    other = write_fake_profile(tmp_path / "other.json", model_1b, Layout(1, 2, 1), 1.0)
    rc = main(["simulate", "--model", str(model_1b), "--trace", str(trace), "--out", str(tmp_path / "f.json"),
               "--latency-profile", str(engine_p), "--device-latency-profile", str(other)])  # fmt: skip
    assert rc == 2 and "measured for" in capsys.readouterr().err


def test_chunk_step_factor_slows_only_steps_with_a_chunk(model_1b, tmp_path):
    """--chunk-step-factor 2: the prefill step (a chunk) takes twice the model's time, the
    decode-only steps after it do not."""
    p = write_fake_profile(tmp_path / "p.json", model_1b, Layout(1, 1, 1), 1.0)
    trace = tmp_path / "one.jsonl"
    trace.write_text(json.dumps({"arrival_s": 0.0, "prompt_len": 64, "output_len": 4}) + "\n")
    base = simulate(model_1b, trace, tmp_path / "a.json", "--latency-profile", str(p))
    slow = simulate(
        model_1b, trace, tmp_path / "b.json", "--latency-profile", str(p), "--chunk-step-factor", "2"
    )
    assert slow["setup"]["chunk_step_factor"] == 2.0
    assert slow["requests"][0]["ttft_s"] == pytest.approx(2 * base["requests"][0]["ttft_s"], rel=1e-6)
    assert slow["requests"][0]["tbt_max_s"] == pytest.approx(base["requests"][0]["tbt_max_s"], rel=1e-6)


def test_idle_step_factor_slows_the_first_step_after_idling(model_1b, tmp_path):
    """--idle-step-factor 3: a request arriving at an idle engine gets its prefill step 3x
    slower (its TTFT), its decode steps are unchanged; one arriving while another prefills
    in the same busy stretch is not slowed."""
    p = write_fake_profile(tmp_path / "p.json", model_1b, Layout(1, 1, 1), 1.0)
    trace = tmp_path / "two.jsonl"
    lines = [
        {"arrival_s": 0.0, "prompt_len": 64, "output_len": 4},
        {"arrival_s": 100.0, "prompt_len": 64, "output_len": 4},
    ]
    trace.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    base = simulate(model_1b, trace, tmp_path / "a.json", "--latency-profile", str(p))
    slow = simulate(
        model_1b, trace, tmp_path / "b.json", "--latency-profile", str(p), "--idle-step-factor", "3"
    )
    assert slow["setup"]["idle_step_factor"] == 3.0
    for a, b in zip(base["requests"], slow["requests"], strict=True):  # both arrive at an idle engine
        assert b["ttft_s"] == pytest.approx(3 * a["ttft_s"], rel=1e-6)
        assert b["tbt_max_s"] == pytest.approx(a["tbt_max_s"], rel=1e-6)


def test_device_profile_is_calibrated_against_by_adaptive_chunking(model_1b, tmp_path):
    """Adaptive chunks sized by an engine profile that underpredicts the device 2x: with online
    calibration the engine learns the device's times and keeps its token gaps near the target."""
    engine_p = write_fake_profile(tmp_path / "engine.json", model_1b, Layout(1, 1, 1), 1.0, 1e-5)
    device_p = write_fake_profile(tmp_path / "device.json", model_1b, Layout(1, 1, 1), 2.0, 1e-5)
    trace = tmp_path / "long.jsonl"
    lines = [
        {"arrival_s": 0.0, "prompt_len": 64, "output_len": 400},
        {"arrival_s": 0.05, "prompt_len": 60000, "output_len": 2},
    ]
    trace.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    # --no-graph-sized-steps: chunks of up to 20 ms, not of the 1024 tokens a graph step holds
    policy = ("--chunk-policy", "adaptive", "--tbt-slo-ms", "20", "--latency-profile", str(engine_p),
              "--device-latency-profile", str(device_p), "--no-graph-sized-steps")  # fmt: skip
    on = simulate(model_1b, trace, tmp_path / "on.json", *policy)
    off = simulate(model_1b, trace, tmp_path / "off.json", *policy, "--no-online-calibration")
    # uncalibrated: chunks sized for 20 ms by the engine's profile run 2x as long on the device;
    # calibrated: only the steps before the calibration warms up do
    assert off["summary"]["tbt_s"]["p99"] > 0.035
    assert on["summary"]["tbt_s"]["p99"] <= 0.021


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_an_arrival_waits_for_the_step_already_planned(model_1b, async_scheduling):
    """As in LLMEngine: with async scheduling the step after the running one is planned before
    a request that arrives during the running one can join, so its first chunk runs one step
    later; without, it joins the next step."""
    args = EngineArgs(
        chunk_size=2048, max_num_batched_tokens=4096, max_model_len=262144, async_scheduling=async_scheduling
    )
    config = simulated_engine_config(model_1b, args, device_spec("h200"))
    model, source = latency_model_for(config, device_spec("h200"))
    engine = SimulatedEngine(config, model, source, record_steps=True)
    engine.add_request("long", 200_000, 2, arrival_s=0.0)
    engine.step()  # the long prompt's first chunk (and, async, its second, planned) are in flight
    engine.add_request("short", 100, 2, arrival_s=engine.now_s)
    while engine.has_work():
        engine.step()
    first = next(i for i, s in enumerate(engine.steps) if any(rid == "short" for rid, _, _ in s.chunks))
    assert first == (2 if async_scheduling else 1)


def test_simulate_takes_the_calibration_quantile_and_the_graph_step_cap(model_1b, tmp_path):
    """Every policy flag `simulate` parses reaches its engine (the quantile once did not)."""
    trace = tmp_path / "t.jsonl"
    trace.write_text(json.dumps({"arrival_s": 0.0, "prompt_len": 64, "output_len": 2}) + "\n")
    default = simulate(model_1b, trace, tmp_path / "default.json", *POLICY)
    setup = default["setup"]
    assert (setup["tbt_slo_quantile"], setup["max_decoding_step_tokens"]) == (0.98, 1024)
    given = simulate(model_1b, trace, tmp_path / "given.json", *POLICY, "--tbt-slo-quantile", "0.9",
                     "--no-graph-sized-steps")  # fmt: skip
    setup = given["setup"]
    assert (setup["tbt_slo_quantile"], setup["max_decoding_step_tokens"]) == (0.9, None)
