"""The OpenAI server under load on one GPU: `mnemosyne serve` + `mnemosyne bench serve`,
both as real subprocesses, on a random-weight model of a real shape (load_format=dummy).

    python -m benchmarks.serve_gpu --shape llama3-8b --out DIR
    python -m benchmarks.serve_gpu --out DIR --scenarios c1,c64 --no-long-mixed --no-offline   # ~4 min

Scenarios (random token-id prompts, greedy, ignore_eos so output lengths are exact):

  c1          one request at a time: TTFT and TBT against their floors
  c16, c64    closed loop with 16 / 64 clients
  all256      256 requests at once; the same workload then runs offline through
              LLM.generate (no HTTP) to price the server layer
  rate4/16    Poisson arrivals, goodput against TTFT 2 s / TBT 50 ms SLOs
  long_mixed  one 64K-token prompt arrives first, short requests at 4 req/s keep
              decoding while its chunks are prefilled (stall-free batching)

Floors (as in mnemosyne/bench/long_context/engine.py): decode step = (weights + KV bytes) / 4.2 TB/s,
prefill = FLOPs / 800 TFLOP/s (linear) + attention FLOPs / 590 TFLOP/s.

The dummy model gets a word-level tokenizer over its whole vocabulary (token i is the
word "w<i>", plus the words of the bench's pool text), so every output token decodes to
text and the pool text tokenizes to real ids.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

for _k, _v in (
    ("NCCL_NVLS_ENABLE", "0"),
    ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
    ("NVSHMEM_DISABLE_NVLS", "1"),
):
    os.environ[_k] = _v

INPUT_LEN, OUTPUT_LEN = 1024, 128
SERVER_FLAGS = ["--max-num-batched-tokens", "1024", "--chunk-size", "512", "--max-model-len", "131072"]
SCENARIOS: list[tuple[str, list[str]]] = [
    ("c1", ["--num-prompts", "8", "--max-concurrency", "1"]),
    ("c16", ["--num-prompts", "96", "--max-concurrency", "16"]),
    ("c64", ["--num-prompts", "256", "--max-concurrency", "64"]),
    ("all256", ["--num-prompts", "256"]),
    ("rate4", ["--num-prompts", "120", "--request-rate", "4"]),
    ("rate16", ["--num-prompts", "240", "--request-rate", "16"]),
]
SLO = ["--slo-ttft-ms", "2000", "--slo-tbt-ms", "50"]
LONG_PROMPT, NUM_SHORT_MIXED = 65536, 80


def write_tokenizer(model_dir: Path, vocab_size: int, eos_id: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from mnemosyne.bench.serve import POOL_TEXT

    words = sorted(set(re.findall(r"\w+|[^\w\s]", POOL_TEXT)))
    vocab = {w: i for i, w in enumerate(words)}
    vocab["[UNK]"] = len(vocab)
    for i in range(len(vocab), vocab_size):
        vocab["<eos>" if i == eos_id else f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<eos>")
    fast.save_pretrained(model_dir)


def wait_healthy(
    url: str, proc: subprocess.Popen, timeout_s: float = 300, log_every_s: float | None = None
) -> None:
    """Poll /health until it answers 200; with log_every_s, print the time waited that often."""
    import httpx

    start = time.monotonic()
    deadline = start + timeout_s
    logged = start
    while time.monotonic() < deadline:
        if log_every_s is not None and time.monotonic() - logged >= log_every_s:
            logged = time.monotonic()
            print(f"  waiting for {url}/health: {logged - start:.0f} s", flush=True)
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server did not become healthy")


def bench(url: str, name: str, flags: list[str], out: Path) -> dict:
    path = out / f"bench_{name}.json"
    cmd = [sys.executable, "-m", "mnemosyne.cli", "bench", "serve", "--base-url", url, "--no-progress"]
    cmd += ["--input-len", str(INPUT_LEN), "--output-len", str(OUTPUT_LEN), *SLO, *flags]
    cmd += ["--result-json", str(path)]
    t0 = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True)
    print(f"== {name} ({time.monotonic() - t0:.1f} s)\n{res.stdout}{res.stderr[-2000:]}", flush=True)
    return json.loads(path.read_text())


def long_mixed(url: str, out: Path, vocab_size: int) -> dict:
    """File dataset: the long prompt first, then short ones (Poisson at 4 req/s)."""
    import random

    rng = random.Random(0)
    lines = [{"prompt": [rng.randrange(1000, vocab_size) for _ in range(LONG_PROMPT)], "output_len": 32}]
    for _ in range(NUM_SHORT_MIXED):
        lines.append(
            {"prompt": [rng.randrange(1000, vocab_size) for _ in range(INPUT_LEN)], "output_len": OUTPUT_LEN}
        )
    path = out / "long_mixed.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines))
    flags = ["--dataset", "file", "--dataset-path", str(path), "--num-prompts", str(len(lines))]
    result = bench(url, "long_mixed", [*flags, "--request-rate", "4"], out)
    path.unlink()  # 64K ids: not worth committing
    recs = result["requests"]
    long = [r for r in recs if r["prompt_len"] == LONG_PROMPT]
    short = [r for r in recs if r["prompt_len"] != LONG_PROMPT and r["success"]]
    long_start, long_ttft = long[0]["start_time"], long[0]["ttft_s"]
    during = [g for r in short for g in _gaps_within(r, long_start, long_start + long_ttft)]
    result["long_request"] = {"ttft_s": long_ttft, "e2e_s": long[0]["e2e_s"]}
    result["short_tbt_during_long_prefill_ms"] = _pcts([g * 1e3 for g in during])
    return result


def _gaps_within(rec: dict, t0: float, t1: float) -> list[float]:
    t = rec["start_time"] + rec["ttft_s"]
    gaps = []
    for g in rec["itl_s"]:
        t += g
        if t0 <= t <= t1:
            gaps.append(g)
    return gaps


def _pcts(xs: list[float]) -> dict:
    import numpy as np

    if not xs:
        return {"count": 0}
    a = np.asarray(xs)
    return {"count": len(xs), "p50": float(np.median(a)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max())}  # fmt: skip


def offline(model_dir: Path, num: int) -> dict:
    """The all256 workload through LLM.generate in this process (no HTTP, no event loop)."""
    import torch

    from mnemosyne import LLM, SamplingParams

    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1000, 128000, (INPUT_LEN,), generator=gen).tolist() for _ in range(num)]
    params = SamplingParams(temperature=0, max_tokens=OUTPUT_LEN, ignore_eos=True)
    args = dict(zip(SERVER_FLAGS[::2], SERVER_FLAGS[1::2], strict=True))
    with LLM(
        model=str(model_dir),
        load_format="dummy",
        max_num_batched_tokens=int(args["--max-num-batched-tokens"]),
        chunk_size=int(args["--chunk-size"]),
        max_model_len=int(args["--max-model-len"]),
    ) as llm:
        llm.generate(prompts[:4], SamplingParams(temperature=0, max_tokens=8))  # warm-up, graph capture
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params)
        dt = time.perf_counter() - t0
    n_out = sum(len(o.token_ids) for o in outs)
    return {"num_requests": num, "duration_s": dt, "output_throughput": n_out / dt,
            "total_token_throughput": (n_out + num * INPUT_LEN) / dt}  # fmt: skip


def floors(model_dir: Path) -> dict:
    import torch

    from mnemosyne.bench.long_context.engine import decode_floor_s, ttft_floor_s
    from mnemosyne.config import ModelConfig

    cfg = ModelConfig.from_pretrained(model_dir, torch.bfloat16)
    return {
        "c1_ttft_ms": ttft_floor_s(cfg, INPUT_LEN, 512) * 1e3,
        "c1_tbt_ms": decode_floor_s(cfg, INPUT_LEN + OUTPUT_LEN // 2) * 1e3,
        "long_ttft_s": ttft_floor_s(cfg, LONG_PROMPT, 1024),
    }


def main() -> None:
    from mnemosyne.bench.long_context.run import write_model_dir
    from mnemosyne.server.launch import free_port

    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--scenarios", default=",".join(n for n, _ in SCENARIOS), help="comma-separated subset")
    p.add_argument("--no-long-mixed", action="store_true", help="skip the 64K-prompt scenario")
    p.add_argument("--no-offline", action="store_true", help="skip the offline LLM.generate comparison")
    ns = p.parse_args()
    chosen = ns.scenarios.split(",")
    unknown = set(chosen) - {n for n, _ in SCENARIOS}
    if unknown:
        p.error(f"unknown scenarios {sorted(unknown)}")
    ns.out.mkdir(parents=True, exist_ok=True)
    model_dir = write_model_dir(ns.shape, Path(tempfile.mkdtemp()))
    write_tokenizer(model_dir, 128256, 128001)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mnemosyne.cli", "serve", "--model", str(model_dir), "--port", str(port)]
    cmd += ["--load-format", "dummy", "--no-access-log", "--log-level", "warning", *SERVER_FLAGS]
    server = subprocess.Popen(cmd)
    results: dict = {"shape": ns.shape, "input_len": INPUT_LEN, "output_len": OUTPUT_LEN,
                     "server_flags": SERVER_FLAGS, "slo": SLO, "floors": floors(model_dir)}  # fmt: skip
    try:
        wait_healthy(url, server)
        bench(url, "warmup", ["--num-prompts", "32"], ns.out)  # CUDA graphs for the batch sizes
        scenarios = [(name, flags) for name, flags in SCENARIOS if name in chosen]
        results["scenarios"] = {name: bench(url, name, flags, ns.out)["summary"] for name, flags in scenarios}
        if not ns.no_long_mixed:
            results["long_mixed"] = {
                k: v for k, v in long_mixed(url, ns.out, 128256).items() if k != "requests"
            }
    finally:
        server.send_signal(signal.SIGINT)
        results["server_exit_code"] = server.wait(timeout=120)
    if not ns.no_offline:
        results["offline_all256"] = offline(model_dir, 256)
    (ns.out / "serve_gpu.json").write_text(json.dumps(results, indent=1))
    shown = ("floors", "offline_all256", "server_exit_code", "scenarios")
    print(json.dumps({k: results[k] for k in shown if k in results}, indent=1))


if __name__ == "__main__":
    main()
