"""Tests of `mnemosyne.bench` (bench serve): datasets, metrics, the SSE client and the whole run,
against a small fake OpenAI-compatible server (FastAPI + uvicorn in a background thread)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from mnemosyne.bench.client import build_payload, encode_payload, send_request
from mnemosyne.bench.datasets import BenchRequest, file_requests, random_requests, random_text_requests
from mnemosyne.bench.metrics import RequestRecord, format_table, summarize
from mnemosyne.bench.serve import add_bench_serve_args, run_bench_serve

FIRST_DELAY_S = 0.05  # the fake server's time to first token
GAP_S = 0.02  # and between tokens
MAX_MODEL_LEN = 64
INTERRUPT_PROMPT_ID = 63  # a completion of this one-token prompt sends this process SIGINT after it


# ----------------------------------------------------------------------------- fake server


def _error(status: int, message: str) -> JSONResponse:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}
    return JSONResponse(body, status_code=status)


def _fake_app() -> FastAPI:
    app = FastAPI()
    vocab: dict[str, int] = {}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        body = await request.json()
        tokens = [vocab.setdefault(w, len(vocab)) for w in body["prompt"].split()]
        return {"tokens": tokens, "count": len(tokens), "max_model_len": MAX_MODEL_LEN}

    async def stream(body: dict[str, Any], chat: bool, n_prompt: int, n_out: int, finish: bool):
        base = {"id": "x", "created": 0, "model": body["model"]}
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str, role: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": text} if role else {"content": text}
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
            else:
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": None}
            return f"data: {json.dumps({**base, 'object': obj, 'choices': [choice]})}\n\n"

        if chat:
            yield chunk("", role=True)
        await asyncio.sleep(FIRST_DELAY_S)
        for k in range(n_out):
            if k:
                await asyncio.sleep(GAP_S)
            yield chunk(f" t{k}")
        if not finish:
            return
        usage = {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}
        yield f"data: {json.dumps({**base, 'object': obj, 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"
        if body.get("prompt") == [INTERRUPT_PROMPT_ID]:  # the client's Ctrl-C, once this request is done
            threading.Timer(0.05, signal.raise_signal, (signal.SIGINT,)).start()

    async def generate(request: Request, chat: bool) -> Any:
        body = await request.json()
        if body["model"] == "bad":
            return _error(400, "the fake server refuses model 'bad'")
        if body["model"] == "secret" and request.headers.get("authorization") != "Bearer sesame":
            return _error(401, "missing or wrong API key")
        assert body["stream"] is True and body["ignore_eos"] is True and body["temperature"] == 0
        assert body["stream_options"] == {"include_usage": True}
        if chat:
            n_prompt = 5 + len(body["messages"][0]["content"].split())  # a "chat template" of 5 tokens
            n_out = body["max_completion_tokens"]
        else:
            prompt = body["prompt"]
            n_prompt = len(prompt) if isinstance(prompt, list) else len(prompt.split())
            n_out = body["max_tokens"]
        if n_prompt + n_out > MAX_MODEL_LEN:
            return _error(400, f"prompt + output = {n_prompt + n_out} tokens exceed {MAX_MODEL_LEN}")
        gen = stream(body, chat, n_prompt, n_out, finish=body["model"] != "truncate")
        return StreamingResponse(gen, media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await generate(request, chat=True)

    return app


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(_fake_app(), log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started, "the fake server did not start"
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=5)
    sock.close()


def _send(
    url: str, endpoint: str, model: str, req: BenchRequest, api_key: str | None = None
) -> RequestRecord:
    async def go() -> RequestRecord:
        async with httpx.AsyncClient(timeout=10) as client:
            return await send_request(client, url, endpoint, model, req, api_key, None)

    return asyncio.run(go())


# ----------------------------------------------------------------------------- metrics


def _rec(ttft: float, itl: list[float], out: int, prompt: int = 10) -> RequestRecord:
    return RequestRecord(True, "", prompt, out, ttft, itl, ttft + sum(itl), 0.0)


def test_summarize_matches_numpy() -> None:
    rng = np.random.default_rng(1)
    recs = [
        _rec(float(rng.uniform(0.01, 0.5)), list(rng.uniform(0.001, 0.05, size=k)), k + 1)
        for k in range(1, 30)
    ]
    recs.append(RequestRecord(False, "boom", 7))
    s = summarize(recs, duration_s=4.0)
    ok = recs[:-1]
    assert s["completed"] == 29 and s["failed"] == 1
    assert s["request_throughput"] == pytest.approx(29 / 4.0)
    out = sum(r.output_len for r in ok)
    assert s["total_output_tokens"] == out and s["total_input_tokens"] == 290
    assert s["output_throughput"] == pytest.approx(out / 4.0)
    assert s["total_token_throughput"] == pytest.approx((out + 290) / 4.0)
    series = {
        "ttft": [r.ttft_s for r in ok],
        "tbt": [g for r in ok for g in r.itl_s],
        "tpot": [(r.e2e_s - r.ttft_s) / (r.output_len - 1) for r in ok],
        "e2e": [r.e2e_s for r in ok],
    }
    for key, vals in series.items():
        ms = np.asarray(vals) * 1000
        assert s[f"mean_{key}_ms"] == pytest.approx(ms.mean())
        assert s[f"median_{key}_ms"] == pytest.approx(np.median(ms))
        assert s[f"p90_{key}_ms"] == pytest.approx(np.percentile(ms, 90))
        assert s[f"p99_{key}_ms"] == pytest.approx(np.percentile(ms, 99))
    # no SLO: every success counts
    assert s["request_goodput"] == pytest.approx(29 / 4.0)
    assert s["slo_attainment"] == pytest.approx(29 / 30)
    assert s["tbt_violation_fraction"] is None


def test_summarize_goodput_with_slos() -> None:
    recs = [
        _rec(0.100, [0.010, 0.010], 3),  # good
        _rec(0.300, [0.010, 0.010], 3),  # TTFT too slow
        _rec(0.100, [0.050, 0.030], 3),  # TPOT 40 ms too slow
        _rec(0.150, [], 1),  # no TPOT: only TTFT applies, good
        RequestRecord(False, "HTTP 400: no"),
    ]
    s = summarize(recs, 2.0, slo_ttft_ms=200, slo_tbt_ms=20)
    assert s["request_goodput"] == pytest.approx(2 / 2.0)
    assert s["slo_attainment"] == pytest.approx(2 / 5)
    assert s["tbt_violation_fraction"] == pytest.approx(2 / 6)  # 50 and 30 ms of six gaps
    assert summarize(recs, 2.0, slo_ttft_ms=200)["request_goodput"] == pytest.approx(3 / 2.0)
    assert summarize(recs, 2.0, slo_tbt_ms=20)["request_goodput"] == pytest.approx(3 / 2.0)
    table = format_table(s)
    assert table.splitlines()[0].startswith("=") and "Serving Benchmark Result" in table.splitlines()[0]
    assert "Request goodput (req/s):" in table and "SLO attainment (%):" in table
    for label in ("TTFT", "TBT", "TPOT", "E2E"):
        assert any(line.startswith(label) and len(line.split()) == 5 for line in table.splitlines())


def test_summarize_all_failed() -> None:
    s = summarize([RequestRecord(False, "x")] * 3, 1.0)
    assert s["completed"] == 0 and s["failed"] == 3 and s["mean_ttft_ms"] is None
    assert s["request_throughput"] == 0.0 and s["slo_attainment"] == 0.0
    assert "n/a" in format_table(s)
    json.dumps(s, allow_nan=False)


# ----------------------------------------------------------------------------- datasets


def test_random_requests_lengths_distinct_deterministic() -> None:
    pool = list(range(100, 150))
    reqs = random_requests(pool, 200, input_len=20, output_len=10, range_ratio=0.5, seed=3)
    assert len(reqs) == 200
    for r in reqs:
        assert isinstance(r.prompt, list) and len(r.prompt) == r.prompt_len
        assert 10 <= r.prompt_len <= 30 and 5 <= r.output_len <= 15
        assert set(r.prompt) <= set(pool)
    assert len({tuple(r.prompt) for r in reqs}) == 200
    assert len({r.prompt[0] for r in reqs[:50]}) == 50  # distinct first tokens while the pool allows
    assert len({r.prompt_len for r in reqs}) > 5 and len({r.output_len for r in reqs}) > 3
    assert reqs == random_requests(pool, 200, 20, 10, 0.5, seed=3)
    assert reqs != random_requests(pool, 200, 20, 10, 0.5, seed=4)
    fixed = random_requests(pool, 5, 7, 3, 0.0, seed=0)
    assert all(r.prompt_len == 7 and r.output_len == 3 for r in fixed)
    assert all(r.prompt_len >= 1 for r in random_requests(pool, 50, 2, 2, 1.0, seed=0))


def test_random_requests_clip_and_errors() -> None:
    pool = list(range(10))
    clipped = random_requests(pool, 20, 100, 10, 0.0, seed=0, max_total_len=64)
    assert all(r.prompt_len == 54 and r.prompt_len + r.output_len == 64 for r in clipped)
    with pytest.raises(ValueError, match="no room for a prompt"):
        random_requests(pool, 3, 10, 64, 0.0, seed=0, max_total_len=64)
    with pytest.raises(ValueError, match="empty"):
        random_requests([], 3, 10, 10, 0.0, seed=0)
    with pytest.raises(ValueError, match="range_ratio"):
        random_requests(pool, 3, 10, 10, 1.5, seed=0)


def test_random_text_requests() -> None:
    words = "the quick brown fox jumps over a lazy dog".split()
    reqs = random_text_requests(words, 2.0, 30, 20, 5, 0.0, seed=1)
    assert all(isinstance(r.prompt, str) and r.prompt_len == -1 and r.output_len == 5 for r in reqs)
    assert all(len(r.prompt.split()) == 10 for r in reqs)
    assert len({r.prompt for r in reqs}) == 30


def test_file_requests(tmp_path) -> None:
    path = tmp_path / "reqs.jsonl"
    path.write_text('{"prompt": "hello there", "output_len": 7}\n\n{"prompt": [1, 2, 3]}\n')
    reqs = file_requests(path, 5, default_output_len=4)
    assert reqs[0] == BenchRequest("hello there", -1, 7)
    assert reqs[1] == BenchRequest([1, 2, 3], 3, 4)
    assert reqs[2:] == [reqs[0], reqs[1], reqs[0]]  # cycles
    assert file_requests(path, 1, 4) == [reqs[0]]


def test_file_requests_trace(tmp_path) -> None:
    path = tmp_path / "trace.jsonl"
    path.write_text(
        '{"prompt": [1, 2], "output_len": 3, "arrival_s": 0.5, "kind": "short"}\n'
        '{"prompt": [4], "arrival_s": 0}\n'
    )
    reqs = file_requests(path, 100, default_output_len=4)  # a trace is never cycled
    assert reqs == [BenchRequest([1, 2], 2, 3, 0.5), BenchRequest([4], 1, 4, 0.0)]
    assert file_requests(path, 1, 4) == reqs[:1]
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"prompt": [1], "arrival_s": 1}\n{"prompt": [2]}\n')
    with pytest.raises(ValueError, match="every line") as e:
        file_requests(mixed, 2, 4)
    assert f"{mixed}:2" in str(e.value)


@pytest.mark.parametrize(
    "line, match",
    [
        ("{not json", "not valid JSON"),
        ('{"text": "x"}', '"prompt" key'),
        ('{"prompt": 5}', "string or a list"),
        ('{"prompt": [1, "a"]}', "non-negative integers"),
        ('{"prompt": "x", "output_len": 0}', "output_len"),
        ('{"prompt": "x", "arrival_s": -1}', "arrival_s"),
        ('{"prompt": "x", "arrival_s": "soon"}', "arrival_s"),
    ],
)
def test_file_requests_malformed(tmp_path, line: str, match: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(ValueError, match=match) as e:
        file_requests(path, 2, 4)
    assert f"{path}:2" in str(e.value)


# ----------------------------------------------------------------------------- client


def test_client_completions_timing(server_url: str) -> None:
    rec = _send(server_url, "completions", "m", BenchRequest(list(range(8)), 8, 5))
    assert rec.success, rec.error
    assert rec.output_len == 5 and rec.prompt_len == 8
    assert FIRST_DELAY_S * 0.8 <= rec.ttft_s < FIRST_DELAY_S + 1.0
    assert len(rec.itl_s) == 4 and all(GAP_S * 0.5 <= g < GAP_S + 0.5 for g in rec.itl_s)
    assert rec.e2e_s >= rec.ttft_s + sum(rec.itl_s) - 1e-6
    assert rec.start_time > 0


def test_client_sends_a_pre_encoded_body_as_is(server_url: str) -> None:
    """bench serve encodes every body before its clock starts; the client sends those bytes."""
    req = BenchRequest(list(range(8)), 8, 5)
    body = encode_payload("completions", "m", req)
    assert json.loads(body) == build_payload("completions", "m", req, None)

    async def go() -> RequestRecord:
        async with httpx.AsyncClient(timeout=10) as client:
            return await send_request(client, server_url, "completions", "m", BenchRequest([], -1, 0), body=body)

    rec = asyncio.run(go())
    assert rec.success, rec.error
    assert rec.output_len == 5 and rec.prompt_len == 8  # from the body, not from the (empty) request given


def test_client_chat_and_usage_prompt_len(server_url: str) -> None:
    rec = _send(server_url, "chat", "m", BenchRequest("one two three", -1, 3))
    assert rec.success, rec.error
    assert rec.prompt_len == 8 and rec.output_len == 3  # the role-only chunk is no token
    assert rec.ttft_s >= FIRST_DELAY_S * 0.8 and len(rec.itl_s) == 2


def test_client_failures(server_url: str) -> None:
    req = BenchRequest([1, 2], 2, 2)
    bad = _send(server_url, "completions", "bad", req)
    assert not bad.success and bad.error == "HTTP 400: the fake server refuses model 'bad'"
    long = _send(server_url, "completions", "m", BenchRequest([1] * 60, 60, 10))
    assert not long.success and "exceed 64" in long.error
    assert not _send(server_url, "completions", "secret", req).success
    authed = _send(server_url, "completions", "secret", req, api_key="sesame")
    assert authed.success, authed.error
    cut = _send(server_url, "completions", "truncate", req)
    assert not cut.success and "[DONE]" in cut.error
    chat_ids = _send(server_url, "chat", "m", req)
    assert not chat_ids.success and "text prompts" in chat_ids.error
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    down = _send(f"http://127.0.0.1:{dead}", "completions", "m", req)
    assert not down.success and "ConnectError" in down.error


# ----------------------------------------------------------------------------- whole run


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_bench_serve_args(parser)
    return parser.parse_args(list(argv))


def test_run_bench_serve_random(server_url: str, tmp_path, capsys) -> None:
    out = tmp_path / "result.json"
    ns = _parse(
        *("--base-url", server_url, "--num-prompts", "12", "--input-len", "20", "--output-len", "4"),
        *("--range-ratio", "0.5", "--request-rate", "100", "--burstiness", "0.5", "--max-concurrency", "4"),
        *("--slo-ttft-ms", "5000", "--slo-tbt-ms", "5000", "--result-json", str(out), "--no-progress"),
    )
    assert run_bench_serve(ns) == 0
    assert gc.get_freeze_count() == 0  # the heap frozen for the run is thawed after it
    stdout = capsys.readouterr().out
    assert "Serving Benchmark Result" in stdout and "Successful requests:" in stdout
    result = json.loads(out.read_text())
    assert result["args"]["model"] == "fake-model" and "api_key" not in result["args"]
    s = result["summary"]
    assert s["completed"] == 12 and s["failed"] == 0 and s["slo_attainment"] == 1.0
    recs = result["requests"]
    assert len(recs) == 12 and all(r["success"] for r in recs)
    assert all(10 <= r["prompt_len"] <= 30 and 2 <= r["output_len"] <= 6 for r in recs)
    assert s["total_input_tokens"] == sum(r["prompt_len"] for r in recs)
    starts = sorted(r["start_time"] for r in recs)
    assert starts[0] >= 0 and starts[-1] > 0  # spread out by the arrival process


def test_run_bench_serve_chat_and_file(server_url: str, tmp_path, capsys) -> None:
    ns = _parse("--base-url", server_url, "--endpoint", "chat", "--num-prompts", "4", "--input-len", "10")
    ns.output_len, ns.no_progress = 3, True
    assert run_bench_serve(ns) == 0
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a b c", "output_len": 2}\n{"prompt": "d e"}\n')
    ns = _parse("--base-url", server_url, "--dataset", "file", "--dataset-path", str(path), "--no-progress")
    ns.num_prompts, ns.output_len = 3, 2
    assert run_bench_serve(ns) == 0
    assert "Successful requests:" in capsys.readouterr().out


def test_run_bench_serve_replays_trace(server_url: str, tmp_path) -> None:
    path = tmp_path / "trace.jsonl"
    arrivals = [0.4, 0.0, 0.2]
    path.write_text(
        "".join(
            f'{{"prompt": [{i + 1}] , "output_len": 2, "arrival_s": {a}}}\n' for i, a in enumerate(arrivals)
        )
    )
    out = tmp_path / "result.json"
    ns = _parse("--base-url", server_url, "--dataset", "file", "--dataset-path", str(path), "--no-progress")
    ns.result_json = str(out)
    assert run_bench_serve(ns) == 0
    recs = json.loads(out.read_text())["requests"]
    assert [r["prompt_len"] for r in recs] == [1, 1, 1] and all(r["success"] for r in recs)
    starts = [r["start_time"] for r in recs]  # records in file order, sent at their arrival times
    assert starts[1] < starts[2] < starts[0] and starts[0] >= 0.4
    ns.request_rate = 5.0
    assert run_bench_serve(ns) == 1  # a trace has its own arrivals


def test_run_bench_serve_errors(server_url: str, capsys) -> None:
    # output longer than the server's max_model_len: caught before sending anything
    assert run_bench_serve(_parse("--base-url", server_url, "--output-len", "80", "--no-progress")) == 1
    assert "no room for a prompt" in capsys.readouterr().err
    # every request fails: exit 1 with the first error
    ns = _parse("--base-url", server_url, "--model", "bad", "--num-prompts", "2", "--no-progress")
    ns.input_len, ns.output_len = 5, 2
    assert run_bench_serve(ns) == 1
    assert "refuses model 'bad'" in capsys.readouterr().err


def test_run_bench_serve_interrupted_reports_what_arrived(server_url: str, tmp_path, capsys) -> None:
    """SIGINT (or SIGTERM, a time limit's) mid-run: the requests in flight are cancelled and keep
    their first token and gaps so far, the ones not sent say so, the finished ones are as
    always, and the result file is written. The signal comes once the short request is done."""
    path = tmp_path / "trace.jsonl"
    lines = [([1], 50, 0.0), ([2], 50, 0.0), ([3], 50, 30.0), ([INTERRUPT_PROMPT_ID], 2, 0.1)]
    path.write_text("".join(f'{{"prompt": {p}, "output_len": {n}, "arrival_s": {a}}}\n' for p, n, a in lines))
    out = tmp_path / "result.json"
    ns = _parse("--base-url", server_url, "--dataset", "file", "--dataset-path", str(path), "--no-progress")
    ns.result_json = str(out)
    t0 = time.monotonic()
    assert run_bench_serve(ns) == 1
    assert time.monotonic() - t0 < 10  # not the third request's 30 s
    result = json.loads(out.read_text())
    assert result["interrupted"] is True and result["summary"]["completed"] == 1
    sent, not_sent, finished = result["requests"][:2], result["requests"][2], result["requests"][3]
    for rec in sent:  # 50 tokens take ~1 s on the fake server: cut mid-stream
        assert not rec["success"] and rec["error"] == "interrupted"
        assert rec["ttft_s"] > 0 and 0 < len(rec["itl_s"]) < 49 and rec["output_len"] == len(rec["itl_s"]) + 1
        assert rec["start_time"] >= 0 and rec["sent"]
    assert not not_sent["success"] and not not_sent["sent"] and not_sent["error"].startswith("not sent")
    assert not_sent["ttft_s"] == 0
    assert finished["success"] and finished["error"] == "" and finished["output_len"] == 2
    assert finished["start_time"] >= 0.1
    assert "interrupted after" in capsys.readouterr().err
