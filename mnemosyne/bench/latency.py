"""`mnemosyne bench latency`: one request at a time, TTFT and TBT at given prompt lengths,
on any model and device (in the spirit of `vllm bench latency`).

Each length runs `--num-iters` requests of random prompt token ids (greedy, ignore_eos,
`--output-len` tokens) after one warm-up request; TTFT = first token - arrival, TBT =
every gap between consecutive tokens. Timings come from the engine (`RequestTiming`).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from mnemosyne.engine.args import EngineArgs
from mnemosyne.engine.llm_engine import LLMEngine
from mnemosyne.engine.summary import engine_summary, format_summary
from mnemosyne.errors import ConfigError
from mnemosyne.models.default_model import DEFAULT_MODEL_NAME
from mnemosyne.outputs import RequestOutput
from mnemosyne.sampling_params import SamplingParams


def add_bench_latency_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("benchmark")
    g.add_argument(
        "--input-lens",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[128, 1024],
        help="prompt lengths in tokens (comma-separated)",
    )
    g.add_argument("--output-len", type=int, default=32, help="output tokens per request")
    g.add_argument("--num-iters", type=int, default=3, help="requests per length (after one warm-up)")
    g.add_argument("--result-json", type=Path, default=None, help="write the results here")


def _one(engine: LLMEngine, prompt: list[int], output_len: int) -> RequestOutput:
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    rid = engine.add_request(prompt, params)
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == rid and out.finished:
                final = out
    assert final is not None
    engine.check_idle_integrity()  # outside the request's timing, as the served engine core runs it
    return final


def _ms(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    values = sorted(values)
    return {
        "median_ms": statistics.median(values) * 1e3,
        "p90_ms": values[min(len(values) - 1, int(0.9 * len(values)))] * 1e3,
        "max_ms": values[-1] * 1e3,
    }


def run_latency(engine: LLMEngine, input_lens: list[int], output_len: int, num_iters: int) -> list[dict]:
    """Per input length: TTFT and TBT statistics over `num_iters` requests."""
    max_len = engine.config.scheduler.max_model_len
    for n in input_lens:
        if n <= 0 or n + output_len > max_len:
            raise ConfigError(f"input length {n} + output {output_len} does not fit max_model_len {max_len}")
    vocab = engine.config.model.vocab_size
    gen = torch.Generator().manual_seed(0)

    def prompt(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=gen).tolist()

    _one(engine, prompt(min(input_lens)), min(output_len, 4))  # warm-up
    rows = []
    for n in input_lens:
        ttfts, tbts = [], []
        for _ in range(num_iters):
            t = _one(engine, prompt(n), output_len).timing
            assert t.ttft is not None
            ttfts.append(t.ttft)
            tbts += [b - a for a, b in zip(t.token_times, t.token_times[1:])]
        rows.append({"input_len": n, "output_len": output_len, "ttft": _ms(ttfts), "tbt": _ms(tbts)})
    return rows


def print_table(rows: list[dict]) -> None:
    print(
        f"{'input':>8} {'output':>6} {'TTFT p50 ms':>12} {'TTFT max ms':>12} {'TBT p50 ms':>11} {'TBT p90 ms':>11}"
    )
    for r in rows:
        ttft, tbt = r["ttft"], r["tbt"]
        print(
            f"{r['input_len']:>8} {r['output_len']:>6} {ttft['median_ms']:>12.1f} {ttft['max_ms']:>12.1f} "
            f"{tbt.get('median_ms', float('nan')):>11.2f} {tbt.get('p90_ms', float('nan')):>11.2f}"
        )


def run_bench_latency(ns: argparse.Namespace, engine_args: EngineArgs) -> int:
    if ns.output_len < 1 or ns.num_iters < 1:
        raise ConfigError("--output-len and --num-iters must be at least 1")
    with LLMEngine.from_args(engine_args) as engine:
        print(format_summary(engine_summary(engine, engine_args.model or DEFAULT_MODEL_NAME)), flush=True)
        rows = run_latency(engine, ns.input_lens, ns.output_len, ns.num_iters)
    print_table(rows)
    if ns.result_json is not None:
        ns.result_json.write_text(
            json.dumps({"args": engine_args.__dict__, "results": rows}, indent=1, default=str)
        )
    return 0
