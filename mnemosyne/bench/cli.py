"""`mnemosyne bench serve | latency | long-context`: the subcommands and their dispatch."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from mnemosyne.errors import ConfigError

MakeParser = Callable[[argparse._SubParsersAction, str, str], argparse.ArgumentParser]


def add_bench_commands(bench: argparse.ArgumentParser, make_parser: MakeParser) -> None:
    from mnemosyne.bench.latency import add_bench_latency_args
    from mnemosyne.bench.long_context.run import add_args as add_long_context_args
    from mnemosyne.bench.serve import add_bench_serve_args
    from mnemosyne.cli_args import add_engine_args

    sub = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    serve = make_parser(sub, "serve", "load generator against a running OpenAI-compatible server")
    add_bench_serve_args(serve)
    serve.set_defaults(func=_serve)

    latency = make_parser(sub, "latency", "one request at a time: TTFT and TBT at given prompt lengths")
    add_bench_latency_args(latency)
    add_engine_args(latency)
    latency.set_defaults(func=_latency)

    lc = make_parser(
        sub,
        "long-context",
        "one GPU: TTFT, TBT and attention kernels up to the KV capacity, against hardware floors and HF",
    )
    add_long_context_args(lc)
    lc.set_defaults(func=_long_context)


def _serve(ns: argparse.Namespace) -> int:
    from mnemosyne.bench.serve import run_bench_serve

    return run_bench_serve(ns)


def _latency(ns: argparse.Namespace) -> int:
    from mnemosyne.bench.latency import run_bench_latency
    from mnemosyne.cli_args import engine_args_from

    return run_bench_latency(ns, engine_args_from(ns))


def require_gpu(benchmark: str) -> None:
    if not torch.cuda.is_available():
        raise ConfigError(f"mnemosyne bench {benchmark} needs a CUDA GPU, and none is visible")


def _long_context(ns: argparse.Namespace) -> int:
    from mnemosyne.bench.long_context.run import run

    require_gpu("long-context")
    after = ns.argv[ns.argv.index("long-context") + 1 :]  # what the per-part processes get
    return run(ns, after)
