"""Command line: `mnemosyne generate`, `serve`, `profile`, `simulate`, `plan` and `bench ...`.

Flags follow vLLM's where they overlap (`-tp/--tensor-parallel-size`,
`-pp/--pipeline-parallel-size`, `--gpu-memory-utilization`, `serve MODEL`,
`--chat-template`, `--generation-config`), beside our own names (`--tp`, `--spp`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from mnemosyne import __version__
from mnemosyne.cli_args import (
    HelpFormatter,
    add_engine_args,
    add_sampling_args,
    engine_args_from,
    sampling_params_from,
)
from mnemosyne.errors import ConfigError, MnemosyneError
from mnemosyne.sampling_params import SamplingParams

if TYPE_CHECKING:
    from mnemosyne.engine.llm_engine import LLMEngine


def _subparser(sub: argparse._SubParsersAction, name: str, help: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
    p.set_defaults(parser=p)  # so a wrong flag is reported with this command's usage
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mnemosyne",
        description="Exact long-context LLM inference.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"mnemosyne {__version__}")
    parser.set_defaults(parser=parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    gen = _subparser(sub, "generate", "generate text for one prompt, streamed to stdout")
    src = gen.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text (default: a short greeting)")
    src.add_argument("--prompt-file", help="read the prompt from this file ('-' for stdin)")
    gen.add_argument(
        "--chat", action="store_true", help="wrap the prompt as a user message in the chat template"
    )
    gen.add_argument("--no-progress", action="store_true", help="hide the prefill progress bar")
    add_sampling_args(gen)
    add_engine_args(gen)
    gen.set_defaults(func=cmd_generate)

    srv = _subparser(sub, "serve", "OpenAI-compatible HTTP server (completions, chat, metrics)")
    s = srv.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on")
    s.add_argument("--port", type=int, default=8000, help="port to listen on")
    s.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' (default: $MNEMOSYNE_API_KEY; unset = no key)",
    )
    s.add_argument("--served-model-name", default=None, help="model id clients send (default: --model)")
    s.add_argument(
        "--max-waiting-requests",
        type=int,
        default=1024,
        help="requests waiting for admission beyond this get 503",
    )
    s.add_argument("--shutdown-timeout-s", type=float, default=30.0, help="drain time on shutdown")
    s.add_argument(
        "--max-tokens-per-call",
        type=int,
        default=None,
        help="cap of prompt + max_tokens summed over one call's choices (default: 4 x the per-request limit)",
    )
    s.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"], help="log level"
    )
    s.add_argument("--no-access-log", action="store_true", help="no line per HTTP request")
    add_engine_args(srv)
    srv.set_defaults(func=cmd_serve)

    prof = _subparser(sub, "profile", "measure step times and fit the latency model (adaptive chunking)")
    from mnemosyne.profiling.command import add_profile_args, cmd_profile

    add_profile_args(prof)
    add_engine_args(prof)
    prof.set_defaults(func=cmd_profile)

    # ---- simulate / plan (mnemosyne/simulator) ----
    from mnemosyne.simulator.command import add_plan_args, add_simulate_args, cmd_plan, cmd_simulate

    simulate = _subparser(sub, "simulate", "run a trace through the real scheduler in virtual time")
    add_simulate_args(simulate)
    simulate.set_defaults(func=cmd_simulate)
    plan = _subparser(sub, "plan", "the tp x spp x kvp layouts for a model, GPU count and context length")
    add_plan_args(plan)
    plan.set_defaults(func=cmd_plan)
    # ---- end simulate / plan ----

    from mnemosyne.bench.cli import add_bench_commands

    bench = _subparser(sub, "bench", "benchmarks")
    add_bench_commands(bench, lambda bench_sub, name, help: _subparser(bench_sub, name, help))
    return parser


def _read_prompt(ns: argparse.Namespace) -> str:
    if ns.prompt_file == "-":
        return sys.stdin.read()
    if ns.prompt_file:
        with open(ns.prompt_file, encoding="utf-8") as f:
            return f.read()
    return ns.prompt if ns.prompt is not None else "Hello! Tell me about the Greek goddess Mnemosyne."


def cmd_generate(ns: argparse.Namespace) -> int:
    from mnemosyne.engine.llm_engine import LLMEngine

    params = sampling_params_from(ns)
    with LLMEngine.from_args(engine_args_from(ns)) as engine:
        return _stream_one(engine, ns, params)


def _stream_one(engine: LLMEngine, ns: argparse.Namespace, params: SamplingParams) -> int:
    from tqdm.auto import tqdm

    from mnemosyne.llm import LLM

    text = _read_prompt(ns)
    prompt: str | list[int] = text
    if ns.chat:
        llm = LLM.__new__(LLM)
        llm.engine = engine
        prompt = llm.apply_chat_template([{"role": "user", "content": text}])
    request_id = engine.add_request(prompt, params)
    bar = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id != request_id:
                continue
            num_prompt = len(out.prompt_token_ids)
            if (
                bar is None
                and not ns.no_progress
                and not out.token_ids
                and out.num_computed_tokens < num_prompt
            ):
                bar = tqdm(total=num_prompt, unit="tok", desc="prefill", file=sys.stderr, leave=False)
            if bar is not None:
                bar.update(min(out.num_computed_tokens, num_prompt) - bar.n)
                if out.token_ids:
                    bar.close()
                    bar = None
            if out.delta_text:
                sys.stdout.write(out.delta_text)
                sys.stdout.flush()
    sys.stdout.write("\n")
    engine.check_idle_integrity()  # after the text is out (it held the last token back inside step())
    return 0


def cmd_serve(ns: argparse.Namespace) -> int:
    from mnemosyne.server.launch import ServerArgs, serve

    if ns.max_waiting_requests < 0:
        raise ConfigError(f"--max-waiting-requests must be >= 0, got {ns.max_waiting_requests}")
    server_args = ServerArgs(
        host=ns.host,
        port=ns.port,
        api_key=ns.api_key or os.environ.get("MNEMOSYNE_API_KEY") or None,
        served_model_name=ns.served_model_name,
        max_waiting_requests=ns.max_waiting_requests,
        shutdown_timeout_s=ns.shutdown_timeout_s,
        max_tokens_per_call=ns.max_tokens_per_call,
        log_level=ns.log_level,
        access_log=not ns.no_access_log,
    )
    return serve(engine_args_from(ns), server_args)


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Like parse_args, but an unknown flag is reported with the usage of the (sub)command
    it was given to, not the top-level one."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ns, extra = parser.parse_known_args(argv)
    if extra:
        ns.parser.error(f"unrecognized arguments: {' '.join(extra)}")
    ns.argv = argv
    return ns


def main(argv: Sequence[str] | None = None) -> int:
    ns = parse_args(build_parser(), argv)
    try:
        return ns.func(ns)
    except MnemosyneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
