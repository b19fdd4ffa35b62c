"""How long one long prompt's arrival stops every other stream of `mnemosyne serve`.

The server writes every stream from one event loop; whatever a request handler does on
it (parse and validate the body, tokenize the prompt) pauses them all. This measures
it with no GPU and no model work in the way:

    stream A   a short prompt, `--stream-tokens` tokens (ignore_eos), streamed; every
               gap between two of its chunks is recorded
    prompt B   sent while A streams: `--prompt-tokens` tokens, as text or as token ids,
               longer than the server's --max-model-len, so the server parses, validates
               and tokenizes it and then answers 400 without the engine ever seeing it

    stall = the longest gap of A while B is in the server, beside A's median gap

    python -m benchmarks.prompt_arrival_stall --out OUT.json [--model DIR] [--prompt-tokens 500000]

The server runs the embedded default model (or --model) on CPU as a subprocess; the
client is this process. Each kind of prompt (text, token ids) is sent `--repeats` times.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import torch

from benchmarks.serve_gpu import wait_healthy
from mnemosyne.models.default_model import resolve_default_model
from mnemosyne.server.launch import free_port


def _stream_gaps(url: str, num_tokens: int, out: list[tuple[float, float]], started: threading.Event) -> None:
    """Stream A: (arrival time, gap since the previous chunk) per chunk, perf_counter seconds."""
    body = {"prompt": "Once upon a time", "max_tokens": num_tokens, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        last = None
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now = time.perf_counter()
            if last is not None:
                out.append((now, now - last))
            last = now
            started.set()


def long_text_prompt(num_tokens: int) -> str:
    """`num_tokens` common words, one token each with their space (for BPE vocabularies)."""
    words = ("the", "of", "and", "to", "in", "is", "that", "for", "it", "as")
    return " ".join(words[i % len(words)] for i in range(num_tokens))


def _long_prompt(kind: str, num_tokens: int, vocab_size: int) -> str | list[int]:
    if kind == "ids":
        return [(i * 7919) % (vocab_size - 1000) + 500 for i in range(num_tokens)]
    return long_text_prompt(num_tokens)


def model_vocab_size(model: str | None) -> int:
    """The served model's vocabulary (config.json of --model, else of the embedded default)."""
    model_dir = Path(model) if model else resolve_default_model(torch.float32)
    return int(json.loads((model_dir / "config.json").read_text())["vocab_size"])


def measure(url: str, kind: str, num_tokens: int, vocab_size: int, stream_tokens: int) -> dict:
    gaps: list[tuple[float, float]] = []
    started = threading.Event()
    stream = threading.Thread(target=_stream_gaps, args=(url, stream_tokens, gaps, started))
    stream.start()
    started.wait(120)
    time.sleep(1.0)  # a steady stream first
    prompt = _long_prompt(kind, num_tokens, vocab_size)
    body = json.dumps({"prompt": prompt, "max_tokens": 1}).encode()
    t0 = time.perf_counter()
    r = httpx.post(url + "/v1/completions", content=body, headers={"content-type": "application/json"}, timeout=600)
    t1 = time.perf_counter()
    stream.join()
    during = [g for t, g in gaps if t0 <= t <= t1 + 0.05]  # a gap ending while B was in the server
    before = [g for t, g in gaps if t < t0]
    return {
        "prompt_kind": kind,
        "prompt_tokens": num_tokens,
        "body_bytes": len(body),
        "status": r.status_code,
        "error": r.json().get("error", {}).get("message", "")[:200] if r.status_code != 200 else "",
        "server_s": t1 - t0,
        "max_gap_during_s": max(during, default=0.0),
        "median_gap_before_s": statistics.median(before) if before else None,
        "num_gaps_during": len(during),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default=None, help="model directory (default: the embedded default)")
    ap.add_argument("--prompt-tokens", type=int, default=500_000)
    ap.add_argument("--stream-tokens", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=2)
    ns = ap.parse_args(argv)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mnemosyne.cli", "serve", *([ns.model] if ns.model else []), "--port", str(port),
           "--max-model-len", "4096", "--no-access-log", "--log-level", "warning"]  # fmt: skip
    server = subprocess.Popen(cmd)
    try:
        wait_healthy(url, server, 300)
        vocab_size = model_vocab_size(ns.model)
        runs = [
            measure(url, kind, ns.prompt_tokens, vocab_size, ns.stream_tokens)
            for kind in ("text", "ids")
            for _ in range(ns.repeats)
        ]
    finally:
        server.terminate()
        server.wait(60)
    for r in runs:
        print(json.dumps(r))
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {
        "benchmark": "prompt_arrival_stall",
        "command": "python -m benchmarks.prompt_arrival_stall " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": f"CPU ({platform.processor() or platform.machine()}), server on the embedded default model",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": git,
        "runs": runs,
    }
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
