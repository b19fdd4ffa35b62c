"""Server sampling: generation_config.json defaults for left-out fields, the penalties,
min_tokens, logit_bias and prompt_logprobs through the openai client (extra_body), each
against `LLM` on the same model; GET /version."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest
from conftest import TEST_DEVICE
from tiny_models import build_tiny_chat_model

from mnemosyne import LLM, EngineArgs, SamplingParams, __version__
from mnemosyne.server.launch import BackgroundServer

GEN_DEFAULTS = {"temperature": 0.0, "repetition_penalty": 0.3}
PROMPT = "the capital of France is"
ENGINE = dict(device=TEST_DEVICE, kv_cache_memory_gb=0.05, chunk_size=64)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = build_tiny_chat_model(tmp_path_factory.mktemp("server_sampling"))
    (d / "generation_config.json").write_text(json.dumps(GEN_DEFAULTS))
    return d


@pytest.fixture(scope="module")
def llm(model_dir: Path):
    with LLM(model=str(model_dir), **ENGINE) as llm:
        yield llm


@pytest.fixture(scope="module")
def server(model_dir: Path):
    with BackgroundServer(EngineArgs(model=str(model_dir), **ENGINE)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: BackgroundServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_version(server: BackgroundServer) -> None:
    assert httpx.get(server.url + "/version").json() == {"version": __version__}


def test_left_out_fields_take_the_generation_config(client: openai.OpenAI, llm: LLM) -> None:
    want = llm.generate(PROMPT, SamplingParams(max_tokens=10, ignore_eos=True, **GEN_DEFAULTS))[0].text
    plain = llm.generate(
        PROMPT, SamplingParams(max_tokens=10, ignore_eos=True, temperature=0, repetition_penalty=1)
    )
    assert want != plain[0].text
    model = client.models.list().data[0].id
    res = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=10, extra_body={"ignore_eos": True}
    )
    assert res.choices[0].text == want  # no temperature, no penalty given: the model's defaults


# (openai client keyword arguments, extra_body, the same as SamplingParams fields)
CASES = {
    "frequency_presence": (
        dict(frequency_penalty=1.5, presence_penalty=0.5),
        {},
        dict(frequency_penalty=1.5, presence_penalty=0.5),
    ),
    "repetition_min_tokens": (
        {},
        {"repetition_penalty": 1.8, "min_tokens": 6},
        dict(repetition_penalty=1.8, min_tokens=6),
    ),
    "logit_bias": (dict(logit_bias={"300": 5, "301": -100}), {}, dict(logit_bias={300: 5.0, 301: -100.0})),
}


@pytest.mark.parametrize("case", list(CASES))
def test_penalties_through_the_openai_client(client: openai.OpenAI, llm: LLM, case: str) -> None:
    kwargs, extra_body, fields = CASES[case]
    messages = [{"role": "user", "content": PROMPT}]
    want = llm.chat(messages, SamplingParams(temperature=0, max_tokens=10, **fields))[0]
    model = client.models.list().data[0].id
    res = client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=10, extra_body=extra_body or None, **kwargs
    )
    assert res.choices[0].message.content == want.text


def test_prompt_logprobs(server: BackgroundServer, llm: LLM) -> None:
    body = {"prompt": PROMPT, "max_tokens": 2, "prompt_logprobs": 2, "temperature": 0}
    res = httpx.post(server.url + "/v1/completions", json=body, timeout=30).json()
    plp = res["choices"][0]["prompt_logprobs"]
    want = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2))[0]
    assert len(plp) == len(want.prompt_token_ids) and plp[0] is None
    for pos in range(1, len(plp)):
        tok = want.prompt_token_ids[pos]
        entry = plp[pos]
        assert abs(entry[str(tok)]["logprob"] - want.prompt_logprobs[pos][tok]) < 1e-4
        ranks = sorted(v["rank"] for v in entry.values() if v["rank"] is not None)
        assert ranks == [1, 2] and all("decoded_token" in v for v in entry.values())
    chat = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 2, "prompt_logprobs": 0}
    res = httpx.post(server.url + "/v1/chat/completions", json=chat, timeout=30).json()
    assert res["prompt_logprobs"][0] is None and len(res["prompt_logprobs"]) == res["usage"]["prompt_tokens"]
    streamed = httpx.post(server.url + "/v1/completions", json={**body, "stream": True}, timeout=30)
    assert streamed.status_code == 400 and "prompt_logprobs" in streamed.json()["error"]["message"]
