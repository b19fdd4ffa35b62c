"""Async streaming client for OpenAI-compatible completion endpoints, timing each content chunk."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx

from mnemosyne.bench.datasets import BenchRequest
from mnemosyne.bench.metrics import RequestRecord

ENDPOINTS: dict[str, str] = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


def build_payload(
    endpoint: str, model: str, req: BenchRequest, extra: dict[str, Any] | None
) -> dict[str, Any]:
    """The JSON body of a streamed greedy request for `req` (`extra` is merged in last)."""
    payload: dict[str, Any] = {"model": model}
    if endpoint == "completions":
        payload["prompt"] = req.prompt
        payload["max_tokens"] = req.output_len
    elif endpoint == "chat":
        if not isinstance(req.prompt, str):
            raise ValueError("the chat endpoint takes text prompts, not token ids")
        payload["messages"] = [{"role": "user", "content": req.prompt}]
        payload["max_completion_tokens"] = req.output_len
    else:
        raise ValueError(f"unknown endpoint {endpoint!r}; expected one of {sorted(ENDPOINTS)}")
    payload.update(
        {"temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    )
    if extra:
        payload.update(extra)
    return payload


def encode_payload(
    endpoint: str, model: str, req: BenchRequest, extra: dict[str, Any] | None = None
) -> bytes:
    """`build_payload` as the JSON bytes sent. `mnemosyne bench serve` encodes every body before
    the clock starts: a 500K-token prompt's body takes ~30 ms to encode, and on the client's
    event loop that would delay the timestamps of every other stream (measured as token gaps)."""
    return json.dumps(build_payload(endpoint, model, req, extra)).encode()


def _error_message(status: int, body: bytes) -> str:
    """`HTTP <status>: <message>` from an OpenAI-style error body (or the raw body)."""
    message = body.decode("utf-8", errors="replace").strip()[:500]
    try:
        obj = json.loads(body)
        err = obj.get("error") if isinstance(obj, dict) else None
        if isinstance(err, dict) and err.get("message"):
            message = str(err["message"])
        elif isinstance(err, str):
            message = err
        elif isinstance(obj, dict) and "detail" in obj:  # FastAPI's own errors
            message = str(obj["detail"])
    except (json.JSONDecodeError, UnicodeDecodeError):
        pass
    return f"HTTP {status}: {message or '(empty body)'}"


def _chunk_text(chunk: dict[str, Any], endpoint: str) -> str:
    """The generated text a streamed chunk carries ('' for role-only, usage and empty chunks)."""
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if endpoint == "chat":
        return (choice.get("delta") or {}).get("content") or ""
    return choice.get("text") or ""


async def send_request(
    client: httpx.AsyncClient,
    base_url: str,
    endpoint: str,
    model: str,
    req: BenchRequest,
    api_key: str | None = None,
    extra: dict[str, Any] | None = None,
    body: bytes | None = None,
    record: RequestRecord | None = None,
) -> RequestRecord:
    """Send one streamed request and time it; never raises (failures become unsuccessful records)
    but for cancellation. `body`: the request already encoded (`encode_payload`), else it is
    encoded here. `record`: the record to fill as the stream arrives, else a new one; cancelled,
    the task leaves it with what arrived so far and the error "interrupted".

    TTFT is the time from sending to the first chunk with generated text; `itl_s` holds the gaps
    between later text chunks; E2E ends at `data: [DONE]`. Token counts come from the final
    usage chunk (`stream_options.include_usage`).
    """
    rec = record if record is not None else RequestRecord(success=False)
    rec.success, rec.error, rec.prompt_len, rec.sent = False, "", req.prompt_len, True
    url = base_url.rstrip("/") + ENDPOINTS.get(endpoint, "")
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    rec.start_time = start = time.perf_counter()
    try:
        content = body if body is not None else encode_payload(endpoint, model, req, extra)
        async with client.stream("POST", url, content=content, headers=headers) as resp:
            if resp.status_code != 200:
                rec.error = _error_message(resp.status_code, await resp.aread())
                return rec
            await _read_stream(resp, endpoint, rec, start)
    except Exception as e:  # network errors, timeouts, bad JSON: a failed request, not a crash
        rec.success = False
        rec.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    except asyncio.CancelledError:
        rec.success = False
        rec.error = "interrupted"
        raise
    return rec


async def _read_stream(resp: httpx.Response, endpoint: str, rec: RequestRecord, start: float) -> None:
    """Consume the server-sent events of `resp`, filling `rec` (success only on a clean [DONE])."""
    first: float | None = None
    last = start
    chunks = 0
    usage: dict[str, Any] | None = None
    done = False
    async for line in resp.aiter_lines():
        line = line.strip()
        if not line.startswith("data:"):
            continue  # blank separators, `: comments`, `event:` fields
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            done = True
            break
        chunk = json.loads(data)
        if isinstance(chunk.get("error"), dict | str):
            rec.error = _error_message(200, data.encode())
            return
        if chunk.get("usage"):
            usage = chunk["usage"]
        if _chunk_text(chunk, endpoint):
            now = time.perf_counter()
            if first is None:
                first = now
                rec.ttft_s = now - start
            else:
                rec.itl_s.append(now - last)
            last = now
            chunks += 1
            rec.output_len = chunks  # so far (an interrupted stream keeps it); the usage's count below
    rec.e2e_s = time.perf_counter() - start
    if not done:
        rec.error = "the stream ended before data: [DONE]"
        return
    if first is None:
        rec.error = "the response contained no generated text"
        return
    rec.output_len = int(usage.get("completion_tokens", chunks)) if usage else chunks
    if rec.prompt_len < 0 and usage and "prompt_tokens" in usage:
        rec.prompt_len = int(usage["prompt_tokens"])
    rec.success = True
