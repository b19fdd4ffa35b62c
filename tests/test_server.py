"""The OpenAI-compatible server, end to end on 127.0.0.1: the official `openai` client
against greedy `LLM.generate`, every error class, aborts on disconnect with KV checks,
64 concurrent streams, Prometheus counts, `mnemosyne bench serve`. The `mnemosyne serve`
command with worker processes, its control ports and its deaths: tests/test_control_plane.py."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import httpx
import openai
import pytest
from conftest import TEST_DEVICE
from tiny_models import build_tiny_chat_model

from mnemosyne import LLM, EngineArgs, SamplingParams
from mnemosyne.server.launch import BackgroundServer, ServerArgs

MAX_TOKENS = 12
PROMPTS = ["the capital of France is", "hello there, how are you", "memory goddess of", "one two"]
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is the capital?"}]


def engine_args(model_dir: Path, **kw) -> EngineArgs:
    base = dict(model=str(model_dir), device=TEST_DEVICE, kv_cache_memory_gb=0.05, chunk_size=64)
    return EngineArgs(**{**base, **kw})


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    return build_tiny_chat_model(tmp_path_factory.mktemp("server_model"))


@pytest.fixture(scope="module")
def llm(chat_model: Path):
    with LLM(model=str(chat_model), device=TEST_DEVICE, kv_cache_memory_gb=0.05, chunk_size=64) as llm:
        yield llm


@pytest.fixture(scope="module")
def server(chat_model: Path):
    with BackgroundServer(
        engine_args(chat_model), ServerArgs(port=0, access_log=False, log_level="warning")
    ) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: BackgroundServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def model_name(server: BackgroundServer) -> str:
    return httpx.get(server.url + "/v1/models").json()["data"][0]["id"]


def greedy(n: int = MAX_TOKENS, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, **kw)


def scrape(server: BackgroundServer) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}, model_name label dropped."""
    text = httpx.get(server.url + "/metrics").text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            key = re.sub(r',?model_name="[^"]*"', "", key).replace("{,", "{").replace("{}", "")
            out[key] = float(value)
    return out


def wait_idle(server: BackgroundServer, timeout_s: float = 30.0) -> None:
    """Until no request is running or waiting and no KV block is used (the KV cache is checked
    in the engine core on the way)."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = server.async_engine.stats
        if stats.num_running == stats.num_waiting == 0 and server.async_engine.check_integrity() == [0.0]:
            break
        assert time.monotonic() < deadline, f"engine still busy: {stats}"
        time.sleep(0.02)


# ---- the happy path ------------------------------------------------------------------------


def test_models_health_tokenize(server: BackgroundServer, llm: LLM) -> None:
    cards = httpx.get(server.url + "/v1/models").json()["data"]
    assert len(cards) == 1 and cards[0]["max_model_len"] == 1024
    assert httpx.get(server.url + "/health").status_code == 200
    tok = httpx.post(server.url + "/tokenize", json={"prompt": PROMPTS[0]}).json()
    assert tok["tokens"] == llm.tokenizer.encode(PROMPTS[0]) and tok["count"] == len(tok["tokens"])
    back = httpx.post(server.url + "/detokenize", json={"tokens": tok["tokens"]}).json()
    assert back["prompt"] == PROMPTS[0]
    chat = httpx.post(server.url + "/tokenize", json={"messages": CHAT}).json()
    assert chat["tokens"] == llm.apply_chat_template(CHAT)


def test_completions_match_llm_generate(server: BackgroundServer, client: openai.OpenAI, llm: LLM) -> None:
    expected = llm.generate(PROMPTS, greedy())
    name = model_name(server)
    res = client.completions.create(model=name, prompt=PROMPTS, max_tokens=MAX_TOKENS, temperature=0)
    assert [c.text for c in sorted(res.choices, key=lambda c: c.index)] == [e.text for e in expected]
    assert [c.finish_reason for c in res.choices] == [e.finish_reason for e in expected]
    assert res.usage.prompt_tokens == sum(len(e.prompt_token_ids) for e in expected)
    assert res.usage.completion_tokens == sum(len(e.token_ids) for e in expected)
    assert res.usage.total_tokens == res.usage.prompt_tokens + res.usage.completion_tokens

    for prompt, exp in zip(PROMPTS, expected, strict=True):
        stream = client.completions.create(
            model=name,
            prompt=prompt,
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == exp.text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == exp.finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(exp.token_ids)
        assert chunks[-1].usage.prompt_tokens == len(exp.prompt_token_ids)
    # A prompt given as token ids gives the same text.
    ids = llm.tokenizer.encode(PROMPTS[1])
    res = client.completions.create(model=name, prompt=ids, max_tokens=MAX_TOKENS, temperature=0)
    assert res.choices[0].text == expected[1].text


def test_chat_matches_llm_chat(server: BackgroundServer, client: openai.OpenAI, llm: LLM) -> None:
    exp = llm.chat(CHAT, greedy(16))[0]
    res = client.chat.completions.create(
        model=model_name(server), messages=CHAT, max_tokens=16, temperature=0
    )
    assert res.choices[0].message.role == "assistant"
    assert res.choices[0].message.content == exp.text
    assert res.choices[0].finish_reason == exp.finish_reason
    assert res.usage.prompt_tokens == len(exp.prompt_token_ids)
    assert res.usage.completion_tokens == len(exp.token_ids)
    chunks = list(
        client.chat.completions.create(
            model=model_name(server),
            messages=CHAT,
            max_completion_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == exp.text
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [exp.finish_reason]
    assert chunks[-1].usage.completion_tokens == len(exp.token_ids)


def test_sampling_parameters(server: BackgroundServer, client: openai.OpenAI, llm: LLM) -> None:
    name = model_name(server)
    # n samples with a seed: reproducible, and seed s gives samples seeds s, s+1.
    kw = dict(model=name, prompt=PROMPTS[0], max_tokens=8, temperature=1.0, seed=7)
    a = client.completions.create(n=2, **kw, extra_body={"top_k": 50, "min_p": 0.01})
    b = client.completions.create(n=2, **kw, extra_body={"top_k": 50, "min_p": 0.01})
    assert [c.text for c in a.choices] == [c.text for c in b.choices] and len(a.choices) == 2
    ref = llm.generate(
        PROMPTS[0], SamplingParams(max_tokens=8, temperature=1.0, seed=8, top_k=50, min_p=0.01)
    )
    assert a.choices[1].text == ref[0].text
    # logprobs: the chosen token's logprob matches the engine's, top entries sorted.
    exp = llm.generate(PROMPTS[2], greedy(6, logprobs=3))[0]
    res = client.completions.create(model=name, prompt=PROMPTS[2], max_tokens=6, temperature=0, logprobs=3)
    lp = res.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx(
        [e[t] for e, t in zip(exp.logprobs, exp.token_ids, strict=True)]
    )
    assert all(len(top) <= 3 for top in lp.top_logprobs)
    assert lp.text_offset[0] == 0
    # echo with logprobs: the prompt comes first, its first token has no logprob.
    res = client.completions.create(
        model=name, prompt=PROMPTS[2], max_tokens=2, temperature=0, echo=True, logprobs=1
    )
    num_prompt = len(exp.prompt_token_ids)
    assert res.choices[0].text.startswith(PROMPTS[2])
    assert res.choices[0].logprobs.token_logprobs[0] is None
    assert len(res.choices[0].logprobs.tokens) == num_prompt + 2
    # chat logprobs.
    res = client.chat.completions.create(
        model=name, messages=CHAT, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2
    )
    content = res.choices[0].logprobs.content
    assert len(content) == res.usage.completion_tokens and all(len(c.top_logprobs) == 2 for c in content)
    # stop strings cut the text; ignore_eos and max_tokens give exactly max_tokens tokens.
    full = llm.generate(PROMPTS[3], greedy(10))[0].text
    stop = full[3:5]
    res = client.completions.create(model=name, prompt=PROMPTS[3], max_tokens=10, temperature=0, stop=[stop])
    assert res.choices[0].text == full[: full.index(stop)] and res.choices[0].finish_reason == "stop"
    # (the server matches stop strings and aborts the request in the engine core: same tokens)
    assert res.usage.completion_tokens == len(llm.generate(PROMPTS[3], greedy(10, stop=[stop]))[0].token_ids)
    wait_idle(server)
    res = client.completions.create(
        model=name, prompt=PROMPTS[3], max_tokens=20, temperature=0, extra_body={"ignore_eos": True}
    )
    assert res.usage.completion_tokens == 20 and res.choices[0].finish_reason == "length"


# ---- errors --------------------------------------------------------------------------------


def _error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_every_error_class_leaves_the_engine_serving(server: BackgroundServer, llm: LLM) -> None:
    url, name = server.url, model_name(server)

    def post(path: str, body: dict) -> httpx.Response:
        return httpx.post(url + path, json=body, timeout=30)

    base = {"model": name, "prompt": PROMPTS[0], "max_tokens": 4}
    for bad, param in [
        ({"temperature": -1}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"logprobs": 99}, "logprobs"),
        ({"top_p": 0}, "top_p"),
        ({"prompt": [1, 2, 10**9]}, None),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"logit_bias": {"not-an-id": 1}}, None),
        ({"logit_bias": {"5": 101}}, None),
        ({"max_token": 4}, "max_token"),  # unknown fields are refused, not ignored
        ({"guided_json": {}, "best_of_n": 2}, "best_of_n"),
        ({"stop": [""]}, None),
    ]:
        err = _error(post("/v1/completions", {**base, **bad}), 400)
        assert param is None or err["param"] == param
    err = _error(
        post("/v1/chat/completions", {"model": name, "messages": [{"role": "wizard", "content": "x"}]}), 400
    )
    assert "role" in err["param"]
    _error(
        post("/v1/chat/completions", {"model": name, "messages": CHAT, "tools": [{"type": "function"}]}), 400
    )
    # Over the context limit: the message names both numbers.
    err = _error(post("/v1/completions", {**base, "max_tokens": 5000}), 400)
    assert err["code"] == "context_length_exceeded" and "5000" in err["message"] and "1024" in err["message"]
    long_chat = [{"role": "user", "content": "word " * 1100}]
    err = _error(post("/v1/chat/completions", {"model": name, "messages": long_chat}), 400)
    assert err["code"] == "context_length_exceeded"
    err = _error(post("/v1/completions", {**base, "model": "gpt-4"}), 404)
    assert err["code"] == "model_not_found" and "gpt-4" in err["message"]
    _error(httpx.post(url + "/v1/completions", content=b"{not json", timeout=30), 400)
    _error(httpx.get(url + "/v1/nothing-here"), 404)
    # Still serving, with the exact greedy text, and nothing leaked.
    res = post("/v1/completions", {**base, "temperature": 0, "max_tokens": MAX_TOKENS}).json()
    assert res["choices"][0]["text"] == llm.generate(PROMPTS[0], greedy())[0].text
    wait_idle(server)


def test_api_key_and_full_queue(chat_model: Path) -> None:
    args = ServerArgs(port=0, api_key="sekret", max_waiting_requests=1, access_log=False, log_level="warning")
    with BackgroundServer(engine_args(chat_model, max_num_seqs=1), args) as srv:
        ok = openai.OpenAI(base_url=srv.url + "/v1", api_key="sekret", max_retries=0)
        name = ok.models.list().data[0].id
        for key in ("wrong", None):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            r = httpx.post(srv.url + "/v1/completions", json={"prompt": "x"}, headers=headers)
            assert _error(r, 401)["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="nope", max_retries=0).models.list()
        assert httpx.get(srv.url + "/health").status_code == 200  # no key needed
        assert httpx.get(srv.url + "/metrics").status_code == 200

        # One running (max_num_seqs=1), one waiting (the limit): the third is refused with 503.
        async def run() -> list[int]:
            headers = {"Authorization": "Bearer sekret"}
            body = {
                "model": name,
                "prompt": PROMPTS[0],
                "max_tokens": 200,
                "temperature": 0,
                "ignore_eos": True,
            }
            async with httpx.AsyncClient(base_url=srv.url, headers=headers, timeout=60) as c:
                first = asyncio.create_task(c.post("/v1/completions", json=body))
                while srv.async_engine.stats.num_running == 0:
                    await asyncio.sleep(0.01)
                second = asyncio.create_task(c.post("/v1/completions", json=body))
                while srv.async_engine.stats.num_waiting == 0:
                    await asyncio.sleep(0.01)
                third = await c.post("/v1/completions", json=body)
                assert _error(third, 503)["code"] == "queue_full"
                return [(await first).status_code, (await second).status_code]

        assert asyncio.run(run()) == [200, 200]
        assert scrape(srv)['mnemosyne:requests_rejected_total{code="queue_full"}'] == 1
        wait_idle(srv)


def test_killed_engine_core_fails_open_streams_with_503(chat_model: Path) -> None:
    """The engine core process is SIGKILLed mid-stream: the stream ends with an error
    event and [DONE], /health and new requests answer 503."""
    with BackgroundServer(engine_args(chat_model)) as srv:
        body = {"prompt": "x", "stream": True, "max_tokens": 500, "ignore_eos": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            srv.async_engine.core.proc.kill()
            events = [first] + [line for line in lines if line.startswith("data: ")]
        assert any("engine is not running" in e for e in events) and events[-1] == "data: [DONE]"
        assert "exited with code -9" in _error(httpx.get(srv.url + "/health"), 503)["message"]
        assert _error(httpx.post(srv.url + "/v1/completions", json={"prompt": "x"}), 503)


# ---- load, disconnects, metrics -----------------------------------------------------------


def test_64_concurrent_streams_with_disconnects(server: BackgroundServer, llm: LLM) -> None:
    """Every 4th client hangs up after two chunks; the others get the exact greedy text."""
    num_clients, num_tokens = 64, 16
    prompts = [f"{PROMPTS[i % 4]} {i}" for i in range(num_clients)]
    expected = [o.text for o in llm.generate(prompts, greedy(num_tokens, ignore_eos=True))]
    quitters = set(range(3, num_clients, 4))
    before = scrape(server)
    name = model_name(server)

    async def one(c: httpx.AsyncClient, i: int) -> tuple[str, int | None]:
        body = {"model": name, "prompt": prompts[i], "max_tokens": num_tokens, "temperature": 0}
        body.update(stream=True, ignore_eos=True, stream_options={"include_usage": True})
        text, usage, num_chunks = "", None, 0
        async with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = httpx.Response(200, content=line[6:]).json()
                if chunk["choices"]:
                    text += chunk["choices"][0]["text"]
                    num_chunks += 1
                    if i in quitters and num_chunks == 2:
                        return text, None  # leaving the block closes the connection mid-stream
                else:
                    usage = chunk["usage"]["completion_tokens"]
        return text, usage

    async def run() -> list[tuple[str, int | None]]:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as c:
            return await asyncio.gather(*(one(c, i) for i in range(num_clients)))

    results = asyncio.run(run())
    for i, (text, usage) in enumerate(results):
        if i not in quitters:
            assert text == expected[i] and usage == num_tokens, i
    wait_idle(server)  # aborted streams freed their blocks; the integrity check passes

    after = scrape(server)

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    # A quitter's request may finish before the server sees the hang-up (its last tokens were
    # generated while the stream still looked open): then it counts as finished, not aborted.
    num_done = delta('mnemosyne:requests_finished_total{reason="length"}')
    num_aborted = delta('mnemosyne:requests_finished_total{reason="abort"}')
    assert num_clients - len(quitters) <= num_done and num_done + num_aborted == num_clients
    assert delta("mnemosyne:prompt_tokens_total") == sum(len(llm.tokenizer.encode(p)) for p in prompts)
    assert delta("mnemosyne:e2e_request_latency_seconds_count") == num_done
    assert delta("mnemosyne:time_to_first_token_seconds_count") == num_clients
    generated = delta("mnemosyne:generation_tokens_total")
    assert num_done * num_tokens + 2 * num_aborted <= generated <= num_clients * num_tokens
    assert delta("mnemosyne:time_between_tokens_seconds_count") == generated - num_clients
    assert after["mnemosyne:num_requests_running"] == after["mnemosyne:num_requests_waiting"] == 0
    assert after['mnemosyne:kv_cache_usage_ratio{kvp_group="0"}'] == 0


def test_prefix_cache_usage_and_metrics(server: BackgroundServer, client: openai.OpenAI, llm: LLM) -> None:
    """A second question about the same document reports its reused prompt tokens in usage
    (whole blocks) and in /metrics; cached blocks left free count as free."""
    wait_idle(server)
    doc = " ".join(PROMPTS * 6) + " memory"
    name, before = model_name(server), scrape(server)
    first = client.completions.create(model=name, prompt=doc + " one", max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    stream = client.completions.create(
        model=name,
        prompt=doc + " two",
        max_tokens=2,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    cached = list(stream)[-1].usage.prompt_tokens_details.cached_tokens
    num_doc = len(llm.tokenizer.encode(doc))
    block = llm.engine.config.cache.block_size
    assert cached == num_doc // block * block > 0
    wait_idle(server)
    after = scrape(server)
    queries = first.usage.prompt_tokens + len(llm.tokenizer.encode(doc + " two"))
    assert (
        after["mnemosyne:prefix_cache_queries_total"] - before["mnemosyne:prefix_cache_queries_total"]
        == queries
    )
    assert after["mnemosyne:prefix_cache_hits_total"] - before["mnemosyne:prefix_cache_hits_total"] == cached
    assert after["mnemosyne:prefix_cache_blocks"] >= num_doc // block
    assert after['mnemosyne:kv_cache_usage_ratio{kvp_group="0"}'] == 0


def test_non_streaming_disconnect_aborts(server: BackgroundServer) -> None:
    """A client that gives up on a long non-streaming call: the request is aborted, KV freed."""
    before = scrape(server)
    body = {"model": model_name(server), "prompt": PROMPTS[1], "max_tokens": 900, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.3))
    wait_idle(server)
    after = scrape(server)
    key = 'mnemosyne:requests_finished_total{reason="abort"}'
    assert after[key] - before.get(key, 0) == 1


def test_bench_serve_prints_the_table(server: BackgroundServer, tmp_path: Path, capsys) -> None:
    from mnemosyne.cli import main

    out_json = tmp_path / "bench.json"
    argv = ["bench", "serve", "--base-url", server.url, "--num-prompts", "12", "--input-len", "24"]
    argv += ["--output-len", "8", "--request-rate", "50", "--slo-ttft-ms", "2000", "--slo-tbt-ms", "500"]
    argv += ["--no-progress", "--result-json", str(out_json)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    for row in ("TTFT", "TBT", "E2E", "Request throughput", "goodput"):
        assert row.lower() in table.lower(), row
    import json

    summary = json.loads(out_json.read_text())["summary"]
    assert summary["completed"] == 12 and summary["failed"] == 0
    assert summary["total_output_tokens"] == 12 * 8
    wait_idle(server)


def test_prefill_lane_serves_the_same_text_and_counts_its_chunks(chat_model: Path, llm: LLM) -> None:
    """`serve` with a prefill lane: a long prompt's text is the engine's without the lane, and
    /metrics counts the lane's chunks."""
    prompt = " ".join(PROMPTS * 8)
    expected = llm.generate([prompt], greedy(8, ignore_eos=True))[0].text
    lane = dict(prefill_lane_free_sms=16, prefill_lane_min_tokens=32, prefill_lane_chunk_tokens=16)
    with BackgroundServer(engine_args(chat_model, **lane)) as srv:
        body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        reply = httpx.post(srv.url + "/v1/completions", json=body, timeout=60).json()
        assert reply["choices"][0]["text"] == expected
        wait_idle(srv)
        metrics = scrape(srv)
        assert metrics["mnemosyne:prefill_lane_chunks_total"] >= 2
        assert metrics["mnemosyne:prefill_lane_steps_sms"] == 0  # no chunk running (and on CPU, no split)
