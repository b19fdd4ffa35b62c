"""What fuzzing and a port of a peer's OpenAI-server tests found, one test per item:
bad Unicode, tiny temperatures, fields that need a 400 naming them, logprobs 0, streamed
text_offset with a stop string, the work cap per call, validation bodies and the
OpenAPI document, and aborts that take effect before the next step."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import TEST_DEVICE
from tiny_models import build_tiny_chat_model

from mnemosyne import EngineArgs, SamplingParams
from mnemosyne.engine.core import EngineCore
from mnemosyne.engine.llm_engine import LLMEngine
from mnemosyne.layers.sampler import Sampler
from mnemosyne.server.launch import BackgroundServer, ServerArgs
from mnemosyne.wire.engine_core import AbortRequests, AddRequests, CoreRequest, pack_token_ids

WORK_CAP = 4000


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    return build_tiny_chat_model(tmp_path_factory.mktemp("hardening_model"))


@pytest.fixture(scope="module")
def url(chat_model: Path):
    args = EngineArgs(model=str(chat_model), device=TEST_DEVICE, kv_cache_memory_gb=0.05, chunk_size=64)
    server_args = ServerArgs(port=0, access_log=False, log_level="warning", max_tokens_per_call=WORK_CAP)
    with BackgroundServer(args, server_args) as s:
        yield s.url


def post(url: str, path: str, body: dict | str) -> httpx.Response:
    if isinstance(body, str):  # raw JSON text (e.g. escapes json.dumps would not write)
        return httpx.post(url + path, content=body, headers={"content-type": "application/json"}, timeout=60)
    return httpx.post(url + path, json=body, timeout=60)


def error(r: httpx.Response, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


def completion(url: str, **body) -> dict:
    r = post(url, "/v1/completions", {"prompt": "the capital of France is", "max_tokens": 8, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_lone_surrogate_is_a_400(url: str) -> None:
    for path, body in [
        ("/v1/completions", '{"prompt": "abc\\ud800def"}'),
        ("/v1/completions", '{"prompt": "abc", "stop": ["\\udfff"]}'),
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi \\ud800"}]}'),
        ("/tokenize", '{"prompt": "\\ud800"}'),
    ]:
        err = error(post(url, path, body))
        assert "surrogate" in err["message"] and err["param"] in ("prompt", "stop", "messages"), err


def test_tiny_temperature_samples_greedily(url: str) -> None:
    logits = torch.randn(3, 50)
    params = [SamplingParams(temperature=t, seed=1) for t in (1e-38, 1e-30, 1e-6)]
    out = Sampler()(logits, params, [torch.Generator().manual_seed(0) for _ in params])
    assert out.token_ids == logits.argmax(-1).tolist()
    greedy = completion(url, temperature=0)["choices"][0]["text"]
    assert completion(url, temperature=1e-38, seed=3)["choices"][0]["text"] == greedy


@pytest.mark.parametrize(
    "bad,param",
    [
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"stream": False, "stream_options": {"include_usage": True}}, "stream_options"),
        ({"stop_token_ids": [1, 10**6]}, "stop_token_ids"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"seed": 2**64}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"seed": 2**64 - 1, "n": 2}, "seed"),
    ],
)
def test_fields_that_need_a_400_naming_them(url: str, bad: dict, param: str) -> None:
    for path, base in [
        ("/v1/completions", {"prompt": "x", "max_tokens": 2}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}),
    ]:
        assert error(post(url, path, {**base, **bad}))["param"] == param
    completion(url, seed=2**64 - 1)  # the extremes are fine
    completion(url, seed=-(2**63))


def test_logprobs_zero_returns_the_sampled_tokens_logprob(url: str) -> None:
    lp = completion(url, temperature=0, logprobs=0)["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 8 and all(isinstance(x, float) for x in lp["token_logprobs"])
    for tok, x, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True):
        assert top == {tok: x}
    top2 = completion(url, temperature=0, logprobs=2)["choices"][0]["logprobs"]["top_logprobs"]
    assert all(2 <= len(t) <= 3 for t in top2)  # top 2 plus the sampled token


def test_streamed_text_offset_matches_non_streamed_with_a_stop_string(url: str) -> None:
    text = completion(url, temperature=0, max_tokens=16)["choices"][0]["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    body = {"prompt": "the capital of France is", "max_tokens": 16, "temperature": 0, "logprobs": 1}
    whole = post(url, "/v1/completions", {**body, "stop": [stop], "echo": True}).json()["choices"][0]
    tokens, offsets, streamed = [], [], ""
    with httpx.stream(
        "POST", url + "/v1/completions", json={**body, "stop": [stop], "echo": True, "stream": True}
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                ch = json.loads(line[6:])["choices"][0]
                streamed += ch["text"]
                if ch["logprobs"]:
                    tokens += ch["logprobs"]["tokens"]
                    offsets += ch["logprobs"]["text_offset"]
    assert streamed == whole["text"] and stop not in whole["text"][len("the capital of France is") :]
    assert tokens == whole["logprobs"]["tokens"]
    assert offsets == whole["logprobs"]["text_offset"]


def test_work_per_call_is_capped(url: str) -> None:
    chat = {"messages": [{"role": "user", "content": "hello"}]}
    err = error(post(url, "/v1/chat/completions", {**chat, "n": 128}))
    assert (
        err["param"] == "n" and "--max-tokens-per-call" in err["message"] and str(WORK_CAP) in err["message"]
    )
    err = error(post(url, "/v1/completions", {"prompt": ["a", "b"], "n": 100, "max_tokens": 30}))
    assert "max-tokens-per-call" in err["message"]
    r = post(url, "/v1/chat/completions", {**chat, "n": 2, "max_tokens": 4})
    assert r.status_code == 200 and len(r.json()["choices"]) == 2


def test_validation_errors_do_not_echo_the_input(url: str) -> None:
    secret = "SECRET-" * 2000
    for body in [
        {"prompt": secret, "n": "many"},
        {"prompt": secret, "temperature": {"x": secret}},
        '{"prompt": "' + secret + '", ',
        [secret],
    ]:
        if isinstance(body, list):
            r = httpx.post(url + "/v1/completions", json=body, timeout=60)
        else:
            r = post(url, "/v1/completions", body)
        err = error(r)
        text = r.text
        assert "SECRET" not in text and ".py" not in text and len(text) < 1000, text[:300]
        assert err["message"]
    assert error(post(url, "/v1/completions", {"prompt": "x", "n": "many"}))["param"] == "n"


def test_openapi_documents_400_not_422(url: str) -> None:
    doc = httpx.get(url + "/openapi.json").json()
    ops = [op for methods in doc["paths"].values() for op in methods.values()]
    assert not any("422" in op.get("responses", {}) for op in ops)
    assert "400" in doc["paths"]["/v1/completions"]["post"]["responses"]
    assert "422" not in json.dumps(doc)


def test_packed_token_ids_round_trip_and_bad_lengths_are_named():
    """CoreRequest carries prompt ids as int32 bytes; the core reads them back exactly, and a
    length that is not whole ids is a ValueError naming it (a server bug: 500, not a crash)."""
    from mnemosyne.wire.engine_core import unpack_token_ids

    ids = [0, 1, 127, 128255, 2**31 - 1]
    assert unpack_token_ids(pack_token_ids(ids)).tolist() == ids
    assert pack_token_ids(np.asarray(ids, dtype=np.int32)) == pack_token_ids(ids)  # the server's checked array
    with pytest.raises(ValueError, match="not a multiple of 4"):
        unpack_token_ids(b"\x00" * 6)


def test_aborted_prefills_are_never_scheduled_again(chat_model: Path) -> None:
    """A storm of long prompts is aborted while prefilling (their aborts and a new request
    arrive together): the very next step runs the new request, no chunk of an aborted
    one is ever scheduled again, and every KV block comes back."""
    args = EngineArgs(
        model=str(chat_model),
        device=TEST_DEVICE,
        kv_cache_memory_gb=0.05,
        chunk_size=16,
        max_num_batched_tokens=64,
    )
    with LLMEngine.from_args(args) as engine:
        core = EngineCore(engine, max_waiting_requests=100)
        greedy = SamplingParams(temperature=0, max_tokens=4)
        storm = [CoreRequest(f"storm-{i}", pack_token_ids([7 + i] * 300), greedy) for i in range(12)]
        assert core.handle(AddRequests(0, storm)).error is None
        core.step()
        scheduled: list[set[str]] = []
        schedule = engine.scheduler.schedule

        def spy():
            out = schedule()
            scheduled.append({c.request.request_id for c in out.chunks})
            return out

        engine.scheduler.schedule = spy
        core.handle(AbortRequests([r.request_id for r in storm]))
        assert core.handle(AddRequests(1, [CoreRequest("next", pack_token_ids([5, 6, 7]), greedy)])).error is None
        outputs = []
        while engine.has_unfinished_requests():
            outputs += core.step()
        assert scheduled[0] == {"next"}
        assert all(s <= {"next"} for s in scheduled)
        assert [o.request_id for o in outputs if o.finished] == ["next"]
        engine.kv_manager.check_integrity()
        assert engine.kv_manager.usage() == [0.0]


def test_core_arrival_cost_probe_runs(tmp_path) -> None:
    """benchmarks/probes/core_arrival_cost.py on a small prompt: every part timed, positive."""
    from benchmarks.probes.core_arrival_cost import main as probe

    res = probe(["--out", str(tmp_path / "c.json"), "--tokens", "5000", "--repeats", "1"])
    (row,) = res["rows"]
    assert row["tokens"] == 5000 and row["frame_mb"] > 0.02
    assert all(row[k] > 0 for k in ("server_ms", "wire_ms", "add_request_ms", "first_schedule_ms"))


def test_bodies_parse_as_json_loads_parses_them(url: str) -> None:
    """The server decodes bodies with msgspec first and hands what it refuses to json.loads,
    so every body means what json.loads makes of it: the same values (big integers
    included), NaN and lone surrogates reach validation as before, malformed JSON is a 400."""
    import asyncio

    from mnemosyne.server.request_body import _JSONRequest

    def parse(body: bytes) -> object:
        async def receive() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}

        scope = {"type": "http", "method": "POST", "headers": [], "path": "/", "query_string": b""}
        return asyncio.run(_JSONRequest(scope, receive).json())

    for body in (b'{"prompt": [1, 2, 3], "seed": 18446744073709551616, "x": [1.5, -0.0, "\\u00e9"]}',
                 b'{"a": 1, "a": 2}'):  # fmt: skip
        assert parse(body) == json.loads(body)
    nan = parse(b'{"temperature": NaN}')["temperature"]
    assert nan != nan  # json.loads' NaN, for validation to refuse as before
    assert parse(b'{"prompt": "abc\\ud800"}') == json.loads(b'{"prompt": "abc\\ud800"}')
    with pytest.raises(json.JSONDecodeError):
        parse(b"{not json")
    r = httpx.post(url + "/v1/completions", content=b'{"prompt": "x", "temperature": NaN}',
                   headers={"content-type": "application/json"}, timeout=60)  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature", r.text
    r = httpx.post(url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_a_long_prompt_yields_to_other_streams_between_its_parse_steps(url: str, monkeypatch) -> None:
    """A /v1/completions body of over LARGE_BODY_BYTES whose prompt is ids: the decoder
    yields to the event loop after splitting the body and after reading the ids into an
    array (each a long C call), and the request is answered as before (here: a 400 naming
    the context length)."""
    import asyncio

    from mnemosyne.server.request_body import LARGE_BODY_BYTES, decode_completion_body

    turns: list[int] = []
    real_sleep = asyncio.sleep

    async def counting_sleep(delay: float, *a, **kw):
        if delay == 0:
            turns.append(0)
        return await real_sleep(delay, *a, **kw)

    num_ids = LARGE_BODY_BYTES // 3 + 1  # "7, " per id
    body = json.dumps({"prompt": [7] * num_ids, "max_tokens": 1}).encode()
    assert len(body) >= LARGE_BODY_BYTES
    monkeypatch.setattr(asyncio, "sleep", counting_sleep)
    value = asyncio.run(decode_completion_body(body))
    assert turns == [0, 0, 0, 0]  # two turns of the loop after each of the two steps
    monkeypatch.undo()
    assert isinstance(value["prompt"], np.ndarray) and value["prompt"].tolist() == [7] * num_ids
    assert value["max_tokens"] == 1 and len(value) == 2
    r = httpx.post(url + "/v1/completions", content=body, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400 and "max_model_len" in r.json()["error"]["message"], r.text


def test_a_large_body_with_a_prompt_of_ids_completes_as_a_small_one(url: str) -> None:
    """A body over LARGE_BODY_BYTES (here by whitespace in the ids' array) takes the array
    path through the handler, the check and the wire, and gives what the same ids give in a
    small body (greedy), echo and usage included."""
    from mnemosyne.server.request_body import LARGE_BODY_BYTES

    ids = [5, 17, 2, 99, 3, 41]
    fields = '"max_tokens": 6, "temperature": 0, "echo": true, "logprobs": 1'
    small = f'{{"prompt": {json.dumps(ids)}, {fields}}}'.encode()
    padded = ("," + " " * (LARGE_BODY_BYTES // (len(ids) - 1))).join(str(t) for t in ids)
    large = f'{{"prompt": [{padded}], {fields}}}'.encode()
    assert len(large) >= LARGE_BODY_BYTES
    headers = {"content-type": "application/json"}
    a, b = (httpx.post(url + "/v1/completions", content=body, headers=headers, timeout=60) for body in (small, large))
    assert a.status_code == b.status_code == 200, (a.text, b.text[:300])
    ja, jb = a.json(), b.json()
    assert ja["choices"] == jb["choices"] and ja["usage"] == jb["usage"]
    assert jb["choices"][0]["logprobs"]["tokens"][: len(ids)]  # the echoed prompt's tokens
