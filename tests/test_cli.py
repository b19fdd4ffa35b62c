"""The command line: vLLM's flag spellings beside ours, generation-config defaults, the
refusal of an over-long --max-model-len, --help/--version/usage, a port in use, the
start-up summary and `mnemosyne bench` (latency on a tiny model; long-context needs a GPU)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
from conftest import TEST_DEVICE
from tiny_models import build_tiny_chat_model

from mnemosyne import LLM, ConfigError, SamplingParams, __version__
from mnemosyne.cli import build_parser, engine_args_from, main, parse_args
from mnemosyne.engine.args import EngineArgs, kv_budget_from_utilization
from mnemosyne.engine.llm_engine import LLMEngine
from mnemosyne.engine.summary import engine_summary, format_summary

GEN_DEFAULTS = {"temperature": 0.0, "repetition_penalty": 0.3}
ENGINE = ["--device", TEST_DEVICE, "--kv-cache-memory-gb", "0.02", "--chunk-size", "64"]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    """A tiny chat model whose generation_config.json makes requests greedy with a penalty."""
    model_dir = build_tiny_chat_model(tmp_path_factory.mktemp("cli_model"))
    (model_dir / "generation_config.json").write_text(json.dumps(GEN_DEFAULTS))
    return model_dir


def ns_of(*argv: str):
    return parse_args(build_parser(), list(argv))


def test_vllm_spellings_mean_the_same_as_ours() -> None:
    ours = engine_args_from(ns_of("serve", "--model", "M", "--tp", "2", "--spp", "3"))
    for argv in (
        ("serve", "M", "-tp", "2", "-pp", "3"),
        ("serve", "M", "--tensor-parallel-size", "2", "--pipeline-parallel-size", "3"),
        ("serve", "--model", "M", "M", "-tp", "2", "--spp", "3"),
        ("generate", "M", "-tp", "2", "-pp", "3"),
    ):
        assert engine_args_from(ns_of(*argv)) == ours, argv
    ns = ns_of("serve", "M", "--gpu-memory-utilization", "0.5", "--chat-template", "t.jinja")
    args = engine_args_from(ns)
    assert (args.gpu_memory_utilization, args.chat_template) == (0.5, "t.jinja")
    with pytest.raises(ConfigError, match="two models"):
        engine_args_from(ns_of("serve", "A", "--model", "B"))


def test_gpu_memory_utilization_has_vllm_meaning() -> None:
    gib = 2**30
    # 80 GiB device, 70 free, 0.5 -> 40 GiB for everything; 16 GiB of weights + activations.
    assert kv_budget_from_utilization(0.5, 70 * gib, 80 * gib, 16 * gib) == 24 * gib
    with pytest.raises(ConfigError, match="only 30.00 GiB are free"):
        kv_budget_from_utilization(0.5, 30 * gib, 80 * gib, 16 * gib)
    with pytest.raises(ConfigError, match="no room for the KV cache"):
        kv_budget_from_utilization(0.1, 70 * gib, 80 * gib, 16 * gib)
    with pytest.raises(ConfigError, match="not both"):
        EngineArgs(gpu_memory_utilization=0.9, kv_cache_memory_gb=1.0).validate()


def test_help_version_and_usage_of_the_subcommand(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"mnemosyne {__version__}"
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for shown in (
        "(default: 8000)",
        "(default: 64)",  # --block-size
        "-tp TP, --tensor-parallel-size TP",
        "--generation-config",
    ):
        assert shown in out, shown
    for argv, usage in (
        (["serve", "--bogus"], "usage: mnemosyne serve"),
        (["generate", "--tp", "2", "--nope"], "usage: mnemosyne generate"),
        (["bench", "latency", "--nope"], "usage: mnemosyne bench latency"),
    ):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert (
            e.value.code == 2
            and err.startswith(usage)
            and "unrecognized arguments: --nope" in err.replace("--bogus", "--nope")
        )


def test_max_model_len_above_the_model_is_refused(chat_model: Path, capsys) -> None:
    for command in (["generate"], ["serve", "--port", "0"]):
        assert main([*command, str(chat_model), "--max-model-len", "100000", *ENGINE]) == 2
        err = capsys.readouterr().err
        assert "100000" in err and "1024" in err and "--allow-long-max-model-len" in err
    ok = EngineArgs(model=str(chat_model), device="cpu", max_model_len=100000, allow_long_max_model_len=True)
    assert ok.create_engine_config().scheduler.max_model_len == 100000


def test_generation_config_defaults_alike_in_cli_and_python(chat_model: Path, capsys) -> None:
    prompt = "the capital of France is"
    with LLM(model=str(chat_model), device=TEST_DEVICE, kv_cache_memory_gb=0.02, chunk_size=64) as llm:
        left_out = llm.generate(prompt, SamplingParams(max_tokens=10, ignore_eos=True))[0]
        explicit = llm.generate(prompt, SamplingParams(max_tokens=10, ignore_eos=True, **GEN_DEFAULTS))[0]
        plain = llm.generate(
            prompt, SamplingParams(max_tokens=10, ignore_eos=True, temperature=0, repetition_penalty=1)
        )[0]
    assert left_out.token_ids == explicit.token_ids != plain.token_ids
    argv = ["generate", str(chat_model), "--prompt", prompt, "--max-tokens", "10", "--ignore-eos"]
    assert main([*argv, "--no-progress", *ENGINE]) == 0
    assert capsys.readouterr().out == left_out.text + "\n"
    with LLM(model=str(chat_model), device="cpu", kv_cache_memory_gb=0.02, generation_config="none") as llm:
        rid = llm.engine.add_request(prompt, SamplingParams(max_tokens=4))
        params = llm.engine.scheduler.get_request(rid).sampling_params
        assert (params.temperature, params.repetition_penalty, params.top_k) == (1.0, 1.0, 0)
        llm.engine.abort(rid)


def test_chat_template_file(chat_model: Path, tmp_path: Path) -> None:
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    with LLM(
        model=str(chat_model), device="cpu", kv_cache_memory_gb=0.02, chat_template=str(template)
    ) as llm:
        ids = llm.apply_chat_template([{"role": "user", "content": "one two"}])
        assert llm.tokenizer.decode(ids) == "one two\n"
    with pytest.raises(ConfigError, match="does not exist"):
        EngineArgs(
            model=str(chat_model), device="cpu", chat_template=str(tmp_path / "nope")
        ).create_engine_config()


def test_port_in_use_fails_before_the_model_loads(capsys) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # The model does not exist: loading it would fail with another message.
        assert main(["serve", "/no/such/model", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"cannot listen on 127.0.0.1:{port}" in err, err


def test_startup_summary(chat_model: Path) -> None:
    args = EngineArgs(model=str(chat_model), device="cpu", kv_cache_memory_gb=0.02, block_size=8)
    with LLMEngine.from_args(args) as engine:
        lines = dict(engine_summary(engine, "tiny", startup_s=1.5))
        text = format_summary(list(lines.items()))
    assert lines["architecture"] == "LlamaForCausalLM" and lines["dtype"] == "float32"
    blocks = engine.config.cache.num_blocks_per_group[0]
    assert lines["KV capacity"] == f"{blocks * 8:,} tokens" and lines["block size"] == "8 tokens"
    assert lines["layout"].startswith("tp 1 x spp 1 x kvp 1") and "1,024" in lines["max_model_len"]
    assert "repetition_penalty=0.3" in lines["sampling defaults"] and "1.5 s" in lines["start-up"]
    for name in ("model", "devices", "chunk policy", "scheduling", "latency model", "prefix caching"):
        assert name in text
    assert lines["prefix caching"] == ("on" if engine.config.cache.enable_prefix_caching else "off")
    assert lines["latency model"].startswith(engine.policies.latency_source)


def test_bench_latency_and_long_context_without_gpu(chat_model: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "latency.json"
    argv = [
        "bench",
        "latency",
        str(chat_model),
        "--input-lens",
        "8,40",
        "--output-len",
        "3",
        "--num-iters",
        "1",
    ]
    assert main([*argv, "--result-json", str(out), *ENGINE]) == 0
    printed = capsys.readouterr().out
    assert "KV capacity" in printed and "TTFT p50 ms" in printed
    rows = json.loads(out.read_text())["results"]
    assert [r["input_len"] for r in rows] == [8, 40] and all(r["tbt"]["median_ms"] > 0 for r in rows)
    if not torch.cuda.is_available():
        assert main(["bench", "long-context"]) == 2
        err = capsys.readouterr().err.strip()
        assert err == "error: mnemosyne bench long-context needs a CUDA GPU, and none is visible"


@pytest.mark.parametrize(
    ("given", "device", "want"),
    [
        ({}, "cpu", ("fixed", "fcfs", 512)),
        ({}, "cuda", ("adaptive", "lars", 512)),
        ({}, "simulated", ("adaptive", "lars", 512)),  # the simulator models GPUs
        ({"chunk_size": 2048}, "cuda", ("fixed", "fcfs", 2048)),  # a chunk size asked for is kept
        ({"chunk_policy": "adaptive"}, "cpu", ("adaptive", "lars", 512)),
        ({"chunk_policy": "adaptive", "scheduling_policy": "fcfs"}, "cuda", ("adaptive", "fcfs", 512)),
        ({"scheduling_policy": "fcfs"}, "cuda", ("adaptive", "fcfs", 512)),
        ({"chunk_policy": "fixed"}, "cuda", ("fixed", "fcfs", 512)),
    ],
)
def test_default_policies_follow_the_device_and_the_flags(given: dict, device: str, want: tuple) -> None:
    """Unnamed policies: adaptive + LARS on a GPU, fixed + FCFS on CPU or with a chunk size
    (engine/args.py: default_policies); the CLI leaves both unnamed unless given."""
    args = EngineArgs(**given)
    pc = args.policy_config(device)
    assert (pc.chunk_policy.value, pc.scheduling_policy.value, args.chunk_size or 512) == want
    ns = parse_args(build_parser(), ["generate", "--prompt", "x"])
    assert engine_args_from(ns).chunk_policy is None and engine_args_from(ns).scheduling_policy is None
