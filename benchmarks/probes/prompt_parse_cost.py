"""What a long prompt costs the server's event loop, piece by piece (CPU, in-process).

For a `--tokens`-long prompt: the time of each step a request handler takes (JSON parse
by json.loads and by msgspec, the request model's validation with either order of the prompt union, the id range
check, decode for echo, encode), the whole path from a body of ids to the checked array as
the server took it before (msgspec values, a list validated and checked) and as it takes it
now (`server/request_body.py`: the prompt's span read into an array), and how long a thread doing the tokenizer work holds
the event-loop thread back (the longest gap of a 1-ms ticker on the main thread while it
runs): a step that holds the GIL blocks every stream for its whole duration.

    python -m benchmarks.probes.prompt_parse_cost --out OUT.json [--tokens 500000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import numpy as np
import torch
from pydantic import TypeAdapter

from benchmarks.prompt_arrival_stall import long_text_prompt
from mnemosyne.bench.client import encode_payload
from mnemosyne.bench.datasets import BenchRequest
from mnemosyne.engine.llm_engine import load_tokenizer
from mnemosyne.models.default_model import resolve_default_model
from mnemosyne.request import check_token_ids
from mnemosyne.server.protocol import CompletionRequest
from mnemosyne.server.request_body import decode_completion_body, decode_json, parse_id_array


def best_ms(fn: Callable[[], object], repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def max_tick_gap_ms(fn: Callable[[], object]) -> float:
    """The longest gap of a 1-ms sleep loop on this thread while `fn` runs on another."""
    done = threading.Event()
    gaps: list[float] = []

    def work() -> None:
        fn()
        done.set()

    th = threading.Thread(target=work)
    last = time.perf_counter()
    th.start()
    while not done.is_set():
        time.sleep(0.001)
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    th.join()
    return max(gaps) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokens", type=int, default=500_000)
    ns = ap.parse_args()
    tok = load_tokenizer(resolve_default_model(torch.float32))
    vocab = len(tok)
    ids = np.random.default_rng(0).integers(500, vocab, ns.tokens).tolist()
    text = long_text_prompt(ns.tokens)
    body = json.dumps({"prompt": ids, "max_tokens": 1}).encode()
    prompt_span = bytes(msgspec.json.decode(body, type=dict[str, msgspec.Raw])["prompt"])
    array_value = asyncio.run(decode_completion_body(body))
    old_union = TypeAdapter(str | list[str] | list[int] | list[list[int]])
    steps_ms = {
        "json.loads (ids body)": best_ms(lambda: json.loads(body)),
        "msgspec.json.decode (ids body, the server's parse)": best_ms(lambda: msgspec.json.decode(body)),
        "validate CompletionRequest (ids)": best_ms(lambda: CompletionRequest.model_validate(json.loads(body))),
        "validate prompt, old union order": best_ms(lambda: old_union.validate_python(ids)),
        "range check, Python loop (old)": best_ms(lambda: any(not 0 <= t < vocab for t in ids)),
        "range check, min/max (new)": best_ms(lambda: (min(ids), max(ids))),
        "ids list -> checked array (check_token_ids, the list path)": best_ms(lambda: check_token_ids(ids, vocab)),
        "the load generator's body (bench encode_payload)": best_ms(
            lambda: encode_payload("completions", "m", BenchRequest(ids, len(ids), 1))
        ),
        "split the body into spans (msgspec, the array path's first step)": best_ms(
            lambda: msgspec.json.decode(body, type=dict[str, msgspec.Raw])
        ),
        "parse_id_array (the prompt's span -> int64 array)": best_ms(lambda: parse_id_array(prompt_span)),
        "validate CompletionRequest (array)": best_ms(lambda: CompletionRequest.model_validate(array_value)),
        "array -> checked array (check_token_ids)": best_ms(lambda: check_token_ids(array_value["prompt"], vocab)),
        "body -> checked ids, list path (before)": best_ms(
            lambda: check_token_ids(list(CompletionRequest.model_validate(decode_json(body)).prompt), vocab)
        ),
        "body -> checked ids, array path (now; yields included)": best_ms(
            lambda: check_token_ids(
                CompletionRequest.model_validate(asyncio.run(decode_completion_body(body))).prompt, vocab
            )
        ),
        "decode ids (old: always, for echo)": best_ms(lambda: tok.decode(ids), 1),
        "encode text": best_ms(lambda: tok.encode(text), 1),
    }
    blocked_ms = {
        "encode text on a thread": max_tick_gap_ms(lambda: tok.encode(text)),
        "decode ids on a thread": max_tick_gap_ms(lambda: tok.decode(ids)),
    }
    result = {
        "probe": "prompt_parse_cost",
        "command": f"python -m benchmarks.probes.prompt_parse_cost --out {ns.out} --tokens {ns.tokens}",
        "device": f"CPU ({platform.processor() or platform.machine()}), the embedded default model's tokenizer",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "tokens": ns.tokens,
        "text_tokens": len(tok.encode(text)),
        "step_ms": steps_ms,
        "event_loop_blocked_ms": blocked_ms,
    }
    print(json.dumps(result, indent=1))
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
