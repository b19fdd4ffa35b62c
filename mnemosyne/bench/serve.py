"""`mnemosyne bench serve`: load an OpenAI-compatible server and report throughput and latency."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

from mnemosyne.bench.client import encode_payload, send_request
from mnemosyne.bench.datasets import BenchRequest, file_requests, random_requests, random_text_requests
from mnemosyne.bench.metrics import RequestRecord, format_table, summarize
from mnemosyne.gc_heap import freeze_startup_heap

# English text whose tokens make the pool of the random dataset (sampled, so only its vocabulary matters).
POOL_TEXT = (
    "The history of computing is a story of people who wanted to think faster than their tools allowed. "
    "Early machines filled entire rooms, consumed enormous amounts of power, and required teams of "
    "engineers to keep them running through the night. Programs were written on paper, punched into "
    "cards, and carried in boxes to an operator who would feed them into the machine and return hours "
    "later with a printed result, or more often with a short note explaining that something had gone "
    "wrong. Over the following decades, transistors replaced vacuum tubes, integrated circuits replaced "
    "individual transistors, and the cost of a single operation fell by many orders of magnitude. "
    "Memory became cheap enough to waste, storage grew from kilobytes to terabytes, and networks "
    "connected laboratories, universities, companies and finally homes across every continent. "
    "Languages evolved as well: assembly gave way to compiled languages, which gave way to interpreted "
    "languages with rich libraries, garbage collection and interactive shells. Each step made it easier "
    "for a curious person to turn an idea into a working program before lunch. Today a small device in "
    "a pocket holds more processing power than the national laboratories of the past, and large models "
    "trained on vast collections of text can answer questions, summarize documents, translate between "
    "languages and write code. Serving such models efficiently is its own engineering problem. A server "
    "must accept many requests at once, schedule their work on expensive accelerators, keep attention "
    "caches in limited memory, and stream every new token back to the user quickly. Latency matters "
    "because people notice delays, while throughput matters because hardware is costly. Good benchmarks "
    "measure both, under realistic arrival patterns, with careful attention to the time before the "
    "first token, the steady pace of the tokens that follow, and the share of requests that finish "
    "within their promised budget. Careful measurement, honest reporting and patient iteration remain "
    "the most reliable path from a clever prototype to a dependable service that people can trust."
)


def add_bench_serve_args(parser: argparse.ArgumentParser) -> None:
    """Add the options of `bench serve` to `parser`."""
    g = parser.add_argument_group("server")
    g.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root URL")
    g.add_argument("--model", default=None, help="model name (default: the first id of GET /v1/models)")
    g.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    g.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY")
    g.add_argument("--timeout-s", type=float, default=600.0, help="per-request timeout (seconds)")
    d = parser.add_argument_group("dataset")
    d.add_argument("--dataset", choices=("random", "file"), default="random")
    d.add_argument(
        "--dataset-path",
        default=None,
        help='JSONL of {"prompt": ..., "output_len": ..., "arrival_s": ...} (arrival_s optional: a timed trace)',
    )
    d.add_argument("--num-prompts", type=int, default=100)
    d.add_argument("--input-len", type=int, default=256, help="random dataset: prompt tokens")
    d.add_argument("--output-len", type=int, default=64, help="output tokens (file dataset: the default)")
    d.add_argument("--range-ratio", type=float, default=0.0, help="random lengths in len*(1 -/+ ratio)")
    d.add_argument("--seed", type=int, default=0)
    t = parser.add_argument_group("traffic")
    t.add_argument(
        "--request-rate", type=float, default=math.inf, help="requests/s (default inf: all at once)"
    )
    t.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrivals (1.0: Poisson)")
    t.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight")
    o = parser.add_argument_group("report")
    o.add_argument("--slo-ttft-ms", type=float, default=None, help="goodput SLO on time to first token")
    o.add_argument("--slo-tbt-ms", type=float, default=None, help="goodput SLO on time per output token")
    o.add_argument("--result-json", default=None, help="write the summary, per-request records and args")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")


def _validate(ns: argparse.Namespace) -> None:
    if ns.num_prompts < 1:
        raise ValueError(f"--num-prompts must be at least 1, got {ns.num_prompts}")
    if not ns.request_rate > 0:
        raise ValueError(f"--request-rate must be positive, got {ns.request_rate}")
    if not (ns.burstiness > 0 and math.isfinite(ns.burstiness)):
        raise ValueError(f"--burstiness must be a positive number, got {ns.burstiness}")
    if ns.max_concurrency is not None and ns.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be at least 1, got {ns.max_concurrency}")
    if ns.dataset == "file" and not ns.dataset_path:
        raise ValueError("--dataset file needs --dataset-path")
    if not ns.timeout_s > 0:
        raise ValueError(f"--timeout-s must be positive, got {ns.timeout_s}")


async def _get_json(client: httpx.AsyncClient, method: str, url: str, headers: dict, **kw: Any) -> Any:
    """One JSON request, raising RuntimeError with the server's message on failure."""
    try:
        resp = await client.request(method, url, headers=headers, **kw)
    except httpx.HTTPError as e:
        raise RuntimeError(f"{method} {url} failed: {type(e).__name__}: {e}") from None
    if resp.status_code != 200:
        raise RuntimeError(f"{method} {url} returned HTTP {resp.status_code}: {resp.text[:500]}")
    return resp.json()


async def _load_requests(
    ns: argparse.Namespace, client: httpx.AsyncClient, model: str, headers: dict
) -> list[BenchRequest]:
    """The benchmark's requests, from the file or from the server's tokenization of POOL_TEXT."""
    if ns.dataset == "file":
        reqs = file_requests(ns.dataset_path, ns.num_prompts, ns.output_len)
        if ns.endpoint == "chat" and any(not isinstance(r.prompt, str) for r in reqs):
            raise ValueError(f"{ns.dataset_path}: the chat endpoint takes text prompts, not token-id lists")
        if reqs[0].arrival_s is not None and math.isfinite(ns.request_rate):
            raise ValueError(
                f'{ns.dataset_path}: its lines carry "arrival_s" (a trace, replayed as timed); '
                "--request-rate applies only to files without it"
            )
        return reqs
    url = ns.base_url.rstrip("/") + "/tokenize"
    body = {"model": model, "prompt": POOL_TEXT, "add_special_tokens": False}
    tok = await _get_json(client, "POST", url, headers, json=body)
    if not isinstance(tok, dict) or not tok.get("tokens"):
        raise RuntimeError(f'POST {url} returned no "tokens" for the pool text')
    tokens = [int(t) for t in tok["tokens"]]
    max_len = tok.get("max_model_len")
    args = (ns.num_prompts, ns.input_len, ns.output_len, ns.range_ratio, ns.seed, max_len)
    if ns.endpoint == "chat":
        words = POOL_TEXT.split()
        return random_text_requests(words, len(tokens) / len(words), *args)
    return random_requests(tokens, *args)


async def _arrivals(n: int, rate: float, burstiness: float, seed: int) -> AsyncIterator[int]:
    """Yield 0..n-1, sleeping gamma-distributed gaps (shape burstiness, mean 1/rate) in between."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        yield i
        if math.isfinite(rate) and i + 1 < n:
            await asyncio.sleep(float(rng.gamma(burstiness, 1.0 / (rate * burstiness))))


async def _trace_arrivals(arrivals_s: list[float], start: float) -> AsyncIterator[int]:
    """Yield the indices by arrival time, each once `arrivals_s[i]` seconds have passed since `start`."""
    for i in sorted(range(len(arrivals_s)), key=arrivals_s.__getitem__):
        delay = start + arrivals_s[i] - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        yield i


async def _benchmark(ns: argparse.Namespace) -> tuple[list[RequestRecord], float, str, bool]:
    """Send all requests on their arrival schedule; (records in dataset order, duration in
    seconds, model name, whether SIGINT / SIGTERM stopped it). Stopped, the requests in flight
    are cancelled and keep what arrived (error "interrupted"), the ones not yet sent say so:
    the caller reports and writes what was measured (a benchmark cut short by a time limit)."""
    headers = {"Authorization": f"Bearer {ns.api_key}"} if ns.api_key else {}
    timeout = httpx.Timeout(ns.timeout_s, connect=min(ns.timeout_s, 30.0))
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        model = ns.model
        if model is None:
            url = ns.base_url.rstrip("/") + "/v1/models"
            data = (await _get_json(client, "GET", url, headers)).get("data") or []
            if not data or not isinstance(data[0], dict) or "id" not in data[0]:
                raise RuntimeError(f"GET {url} listed no models; pass --model")
            model = str(data[0]["id"])
        reqs = await _load_requests(ns, client, model, headers)
        bodies = [encode_payload(ns.endpoint, model, r) for r in reqs]  # before the clock (encode_payload)
        records = [RequestRecord(False, NOT_SENT, r.prompt_len, sent=False) for r in reqs]
        sem = asyncio.Semaphore(ns.max_concurrency) if ns.max_concurrency else None
        bar = tqdm(total=len(reqs), disable=ns.no_progress, file=sys.stderr, desc="requests")

        async def one(i: int) -> None:
            send = send_request(
                client, ns.base_url, ns.endpoint, model, reqs[i], ns.api_key, body=bodies[i], record=records[i]
            )
            if sem is None:
                await send
            else:
                async with sem:
                    await send
            bar.update(1)

        # This process imports torch too: a full garbage collection would pause every stream's
        # timing ~80 ms (mnemosyne/gc_heap.py); the heap is frozen for the run, thawed after it.
        freeze_startup_heap()
        tasks: list[asyncio.Task] = []
        with _stopped_by_signals() as stopped:
            try:
                start = time.perf_counter()
                if reqs[0].arrival_s is not None:  # a trace: every request has its time
                    schedule = _trace_arrivals([float(r.arrival_s or 0.0) for r in reqs], start)
                else:
                    schedule = _arrivals(len(reqs), ns.request_rate, ns.burstiness, ns.seed)
                async for i in schedule:
                    tasks.append(asyncio.create_task(one(i)))
                await asyncio.gather(*tasks)
            except asyncio.CancelledError:
                if not stopped.is_set():
                    raise
                asyncio.current_task().uncancel()  # type: ignore[union-attr]  # handled: the run goes on
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            finally:
                duration = time.perf_counter() - start
                gc.unfreeze()
        bar.close()
        for rec in records:
            if rec.sent:
                rec.start_time -= start  # seconds since the benchmark started
    return records, duration, model, stopped.is_set()


NOT_SENT = "not sent: the benchmark was interrupted"  # the error text of a record never sent


@contextlib.contextmanager
def _stopped_by_signals() -> Iterator[asyncio.Event]:
    """While inside: SIGINT or SIGTERM sets the event and cancels the current task (once;
    the handlers are removed on the way out). Where the loop cannot take signal handlers (not
    the main thread), nothing is installed."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    stopped = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)

    def stop() -> None:
        if not stopped.is_set() and task is not None:
            stopped.set()
            task.cancel()

    installed = []
    for sig in signals:
        try:
            loop.add_signal_handler(sig, stop)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no Unix signals
            pass
    try:
        yield stopped
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def _jsonable(value: Any) -> Any:
    """Arguments as JSON values: non-finite floats as strings, unknown objects as their repr."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)


def _write_result(
    path: str, ns: argparse.Namespace, model: str, summary: dict, records: list, interrupted: bool
) -> None:
    args = {k: _jsonable(v) for k, v in vars(ns).items() if k != "api_key" and not callable(v)}
    args["model"] = model
    result = {"args": args, "interrupted": interrupted, "summary": summary, "requests": [asdict(r) for r in records]}
    Path(path).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def run_bench_serve(ns: argparse.Namespace) -> int:
    """Run the benchmark described by `ns`; print the table. 0 if any request succeeded, else 1."""
    try:
        _validate(ns)
        records, duration, model, interrupted = asyncio.run(_benchmark(ns))
    except (ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    summary = summarize(records, duration, ns.slo_ttft_ms, ns.slo_tbt_ms)
    print(format_table(summary))
    if ns.result_json:
        _write_result(ns.result_json, ns, model, summary, records, interrupted)
    if interrupted:
        num_sent = sum(r.sent for r in records)
        print(
            f"interrupted after {duration:.1f} s: {sum(r.success for r in records)} of {len(records)} requests "
            f"finished, {num_sent} sent; what arrived is reported" + (f" in {ns.result_json}" if ns.result_json else ""),
            file=sys.stderr,
        )
        return 1
    failed = [r for r in records if not r.success]
    if failed:
        print(
            f"{len(failed)} of {len(records)} requests failed; first error: {failed[0].error}",
            file=sys.stderr,
        )
    return 0 if len(failed) < len(records) else 1
