"""Prefix caching on one GPU, on a random-weight model of a real shape (load_format=dummy).

    python -m benchmarks.prefix_cache --out benchmarks/results/prefix_cache_h200_DATE.json

Part 1, multi-turn over one long document (offline engine, this process): a 128K-token
document and 4 questions as one conversation; turn k's prompt is turn k-1's prompt, its
32-token answer and a 32-token question. Turn 1 prefills everything; turns 2-4 take the
whole history from the cache and compute only the last partial block, the answer and the
question. Reported per turn: TTFT, tokens taken from the cache, TTFT / turn-1 TTFT
(target <= 0.05), and the floor of the tokens actually computed (FLOPs / peak, as in
mnemosyne/bench/long_context/engine.py: linear 800 TFLOP/s, attention 590 TFLOP/s).

Part 2, serving with a shared system prompt (`mnemosyne serve` + `mnemosyne bench serve`,
both subprocesses, a JSONL dataset): every request is the same 4096-token system prompt
plus 256 tokens of its own, 128 output tokens, closed loop with 32 clients; once with
--enable-prefix-caching and once with --no-enable-prefix-caching. Reported: the bench
summaries (throughput, TTFT/TBT percentiles) and the server's prefix-cache counters.

About 3 minutes on one H200 with the defaults; prints and writes one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.serve_gpu import wait_healthy, write_tokenizer

SERVER_FLAGS = ["--max-num-batched-tokens", "2048", "--chunk-size", "2048", "--max-model-len", "32768"]


def _ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1000, 128000) for _ in range(n)]


# ---- part 1: multi-turn over one document ---------------------------------------------------


def multi_turn(model_dir: Path, doc_tokens: int, num_turns: int, turn_tokens: int, chunk: int) -> dict:
    from mnemosyne import SamplingParams
    from mnemosyne.bench.long_context.engine import chunk_floor_s, run_to_completion, ttft_floor_s
    from mnemosyne.engine.args import EngineArgs
    from mnemosyne.engine.llm_engine import LLMEngine

    args = EngineArgs(
        model=str(model_dir), load_format="dummy", dtype="bfloat16", chunk_size=chunk,
        max_num_batched_tokens=chunk, max_num_seqs=8, max_model_len=doc_tokens + 8192,
    )  # fmt: skip
    engine = LLMEngine.from_args(args)
    cfg = engine.config.model
    params = SamplingParams(temperature=0, max_tokens=turn_tokens, ignore_eos=True)
    rng = random.Random(0)

    def run(prompt: list[int]):
        return run_to_completion(engine, prompt, params)

    # Warm-up (not measured): Triton JIT, cuDNN plans, decode graphs; a cold prefill and a
    # chunk after a cached prefix, on tokens the measured document never shares.
    warm = _ids(random.Random(1), min(12000, max(64, doc_tokens // 10)))
    run(warm)
    run(warm + _ids(rng, 100))

    doc = _ids(rng, doc_tokens)
    prompt = doc + _ids(rng, turn_tokens)
    turns = []
    for k in range(num_turns):
        out = run(prompt)
        cached, n = out.num_cached_tokens, len(prompt)
        computed = n - cached
        floor = ttft_floor_s(cfg, n, chunk) if cached == 0 else chunk_floor_s(cfg, computed, cached)
        turns.append({
            "turn": k + 1, "prompt_tokens": n, "cached_tokens": cached, "computed_tokens": computed,
            "ttft_s": out.timing.ttft, "ttft_floor_s": floor,
            "e2e_s": out.timing.finished_time - out.timing.arrival_time,
        })  # fmt: skip
        print(json.dumps(turns[-1]), flush=True)
        prompt = prompt + out.token_ids + _ids(rng, turn_tokens)
    engine.shutdown()
    first = turns[0]["ttft_s"]
    for t in turns:
        t["ttft_vs_turn1"] = t["ttft_s"] / first
    later = [t["ttft_vs_turn1"] for t in turns[1:]]
    return {
        "doc_tokens": doc_tokens,
        "chunk": chunk,
        "turns": turns,
        "max_ttft_ratio_turns_2_on": max(later) if later else None,
        "target_ratio": 0.05,
        "met": bool(later) and max(later) <= 0.05,
    }


# ---- part 2: serving with a shared system prompt ----------------------------------------------


def _scrape(url: str) -> dict[str, float]:
    """The server's prefix-cache and KV-usage series, model_name label dropped."""
    import httpx

    out: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(("mnemosyne:prefix_cache", "mnemosyne:kv_cache_usage")):
            key, value = line.rsplit(" ", 1)
            out[re.sub(r',?model_name="[^"]*"', "", key).replace("{,", "{").replace("{}", "")] = float(value)
    return out


def _bench(url: str, name: str, flags: list[str], out: Path) -> dict:
    path = out / f"bench_{name}.json"
    cmd = [sys.executable, "-m", "mnemosyne.cli", "bench", "serve", "--base-url", url, "--no-progress"]
    cmd += [*flags, "--result-json", str(path)]
    t0 = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True)
    print(f"== {name} ({time.monotonic() - t0:.1f} s)\n{res.stdout}{res.stderr[-2000:]}", flush=True)
    summary = json.loads(path.read_text())["summary"]
    path.unlink()
    return summary


def serving(model_dir: Path, out: Path, system_tokens: int, user_tokens: int, num_prompts: int,
            output_len: int, concurrency: int) -> dict:  # fmt: skip
    from mnemosyne.server.launch import free_port

    rng = random.Random(2)
    system = _ids(rng, system_tokens)
    lines = [
        {"prompt": system + _ids(rng, user_tokens), "output_len": output_len} for _ in range(num_prompts)
    ]
    data = out / "shared_system_prompt.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in lines))
    flags = ["--dataset", "file", "--dataset-path", str(data), "--num-prompts", str(num_prompts)]
    flags += ["--max-concurrency", str(concurrency)]
    results = {}
    try:
        for mode in ("--enable-prefix-caching", "--no-enable-prefix-caching"):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            cmd = [
                sys.executable,
                "-m",
                "mnemosyne.cli",
                "serve",
                "--model",
                str(model_dir),
                "--port",
                str(port),
            ]
            cmd += [
                "--load-format",
                "dummy",
                "--no-access-log",
                "--log-level",
                "warning",
                mode,
                *SERVER_FLAGS,
            ]
            server = subprocess.Popen(cmd)
            name = "cache" if mode == "--enable-prefix-caching" else "no_cache"
            try:
                wait_healthy(url, server)
                warm = [
                    "--num-prompts",
                    "16",
                    "--input-len",
                    "512",
                    "--output-len",
                    "16",
                    "--max-concurrency",
                    "16",
                ]
                _bench(url, f"warmup_{name}", warm, out)  # graphs, kernels; random prompts share nothing
                before = _scrape(url)
                summary = _bench(url, name, flags, out)
                after = _scrape(url)
                counters = {k: after[k] - before.get(k, 0.0) for k in after if k.endswith("_total")}
                results[name] = {
                    "summary": summary,
                    "prefix_cache_counters": counters,
                    "metrics_after": after,
                }
            finally:
                server.send_signal(signal.SIGINT)
                results.setdefault(name, {})["server_exit_code"] = server.wait(timeout=120)
    finally:
        data.unlink()
    c, n = results["cache"]["summary"], results["no_cache"]["summary"]
    speedups = {
        k: c[k] / n[k]
        for k in ("request_throughput", "output_throughput", "total_token_throughput")
        if n.get(k)
    }
    ttft = {k: (c.get(k), n.get(k)) for k in c if "ttft" in k and isinstance(c.get(k), float)}
    return {
        "system_tokens": system_tokens, "user_tokens": user_tokens, "num_prompts": num_prompts,
        "output_len": output_len, "concurrency": concurrency, "server_flags": SERVER_FLAGS,
        "cache_over_no_cache": speedups, "ttft_ms_cache_vs_no_cache": ttft, "runs": results,
    }  # fmt: skip


def main() -> None:
    from mnemosyne.bench.long_context.run import write_model_dir

    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--out", type=Path, required=True, help="the JSON result file")
    p.add_argument("--doc-tokens", type=int, default=131072)
    p.add_argument("--num-turns", type=int, default=4)
    p.add_argument("--turn-tokens", type=int, default=32, help="question and answer tokens per turn")
    p.add_argument("--chunk", type=int, default=8192, help="multi-turn prefill chunk and token budget")
    p.add_argument("--system-tokens", type=int, default=4096)
    p.add_argument("--user-tokens", type=int, default=256)
    p.add_argument("--num-prompts", type=int, default=192)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--skip-serving", action="store_true")
    p.add_argument("--skip-multi-turn", action="store_true")
    ns = p.parse_args()
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp())
    model_dir = write_model_dir(ns.shape, work)
    write_tokenizer(model_dir, 128256, 128001)
    t0 = time.monotonic()
    results: dict = {"shape": ns.shape, "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    if not ns.skip_multi_turn:
        results["multi_turn"] = multi_turn(model_dir, ns.doc_tokens, ns.num_turns, ns.turn_tokens, ns.chunk)
    if not ns.skip_serving:
        results["serving"] = serving(
            model_dir, work, ns.system_tokens, ns.user_tokens, ns.num_prompts, ns.output_len, ns.concurrency
        )
    results["wall_s"] = time.monotonic() - t0
    ns.out.write_text(json.dumps(results, indent=1))
    summary = {"multi_turn": {k: v for k, v in results.get("multi_turn", {}).items() if k != "turns"}}
    if "serving" in results:
        summary["serving"] = {
            k: results["serving"][k] for k in ("cache_over_no_cache", "ttft_ms_cache_vs_no_cache")
        }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
