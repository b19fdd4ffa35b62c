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
from dataclasses import fields
from typing import TYPE_CHECKING

from mnemosyne import __version__
from mnemosyne.config import (
    AttentionBackendKind,
    ChunkPolicyKind,
    GenerationConfigMode,
    LoadFormat,
    SchedulingPolicyKind,
)
from mnemosyne.engine.args import EngineArgs
from mnemosyne.errors import ConfigError, MnemosyneError
from mnemosyne.sampling_params import SamplingParams

if TYPE_CHECKING:
    from mnemosyne.engine.llm_engine import LLMEngine

_FROM_GENERATION_CONFIG = "the model's generation_config.json, else %s"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every default (a None default is left out: its help says what happens)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


def add_engine_args(p: argparse.ArgumentParser) -> None:
    d = EngineArgs()
    p.add_argument(
        "model_tag",
        nargs="?",
        default=None,
        metavar="MODEL",
        help="local Hugging Face model directory (same as --model)",
    )
    g = p.add_argument_group("engine")
    g.add_argument(
        "--model",
        default=None,
        help="local Hugging Face model directory (default: embedded SmolLM2-135M-Instruct)",
    )
    g.add_argument(
        "--dtype",
        default=d.dtype,
        help="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16 or float16",
    )
    g.add_argument("--device", default=d.device, help="auto, cpu or cuda[:N]")
    g.add_argument(
        "--max-model-len",
        type=int,
        default=d.max_model_len,
        help="longest prompt + output (default: the model's max_position_embeddings)",
    )
    g.add_argument(
        "--allow-long-max-model-len",
        action="store_true",
        help="accept a --max-model-len above the model's max_position_embeddings",
    )
    g.add_argument("--block-size", type=int, default=d.block_size, help="tokens per KV-cache block")
    g.add_argument(
        "--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens, help="tokens per step"
    )
    g.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs, help="requests per step")
    g.add_argument("--chunk-size", type=int, default=d.chunk_size, help="prefill chunk tokens")
    g.add_argument(
        "--kv-cache-memory-gb",
        type=float,
        default=d.kv_cache_memory_gb,
        help="KV cache per device in GiB (default: from --gpu-memory-utilization or "
        "--kv-cache-memory-fraction on CUDA, 2 GiB split over the devices on CPU)",
    )
    g.add_argument(
        "--kv-cache-memory-fraction",
        type=float,
        default=d.kv_cache_memory_fraction,
        help="fraction of the CUDA memory left free after weights and activations for the KV cache",
    )
    g.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=d.gpu_memory_utilization,
        help="vLLM's: fraction of each GPU's total memory for weights, activations and KV "
        "(replaces --kv-cache-memory-fraction)",
    )
    g.add_argument("--seed", type=int, default=d.seed, help="engine seed (unseeded sampling RNG)")
    g.add_argument(
        "--attention-backend",
        default=d.attention_backend,
        choices=[k.value for k in AttentionBackendKind],
        help="auto: Triton/cuDNN kernels on CUDA, the torch reference on CPU",
    )
    g.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (decode steps and piecewise mixed steps)")
    g.add_argument(
        "--load-format",
        default=d.load_format,
        choices=[k.value for k in LoadFormat],
        help="dummy: random weights from config.json alone (benchmarks)",
    )
    add_policy_args(p, d)
    g.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=d.enable_prefix_caching,
        help="reuse the KV of full blocks shared with earlier requests' prefixes (default: on)",
    )
    g.add_argument(
        "--generation-config",
        default=d.generation_config,
        choices=[k.value for k in GenerationConfigMode],
        help="auto: sampling fields a request leaves out take the model's generation_config.json "
        "values; none: ignore that file",
    )
    g.add_argument(
        "--chat-template",
        default=d.chat_template,
        metavar="FILE",
        help="Jinja chat template file replacing the tokenizer's",
    )
    par = p.add_argument_group("parallelism (one worker process per device: tp x spp x kvp)")
    par.add_argument(
        "--tp", "-tp", "--tensor-parallel-size", dest="tp", type=int, default=d.tp,
        help="tensor-parallel ranks per stage",
    )  # fmt: skip
    par.add_argument(
        "--spp", "-pp", "--pipeline-parallel-size", dest="spp", type=int, default=d.spp,
        help="sequence-pipeline stages",
    )  # fmt: skip
    par.add_argument("--kvp", type=int, default=d.kvp, help="KV-cache-parallel groups")
    par.add_argument(
        "--max-tokens-per-kvp-group",
        type=int,
        default=d.max_tokens_per_kvp_group,
        help="tokens of one request a KVP group holds before the next is onboarded (default: a whole group)",
    )
    par.add_argument(
        "--pipeline-depth", type=int, default=d.pipeline_depth, help="micro-batches in flight (default: spp)"
    )
    par.add_argument(
        "--driver-address",
        default=d.driver_address,
        help="bind here (tcp://HOST:PORT) and wait for workers started by torchrun instead of local ones",
    )
    par.add_argument(
        "--worker-timeout-s", type=float, default=d.worker_timeout_s, help="collectives and worker replies"
    )
    par.add_argument(
        "--heartbeat-timeout-s", type=float, default=d.heartbeat_timeout_s,
        help="a worker or engine core silent this long is dead",
    )  # fmt: skip


def add_policy_args(p: argparse.ArgumentParser, d: EngineArgs) -> None:
    pol = p.add_argument_group("scheduling policy (chunk sizes and order)")
    pol.add_argument(
        "--chunk-policy",
        default=d.chunk_policy,
        choices=[k.value for k in ChunkPolicyKind],
        help="fixed: --chunk-size; adaptive: the largest chunk whose predicted step time fits --tbt-slo-ms",
    )
    pol.add_argument(
        "--scheduling-policy",
        default=d.scheduling_policy,
        choices=[k.value for k in SchedulingPolicyKind],
        help="fcfs: by arrival; lars: least relative slack first, with space sharing for long prefills",
    )
    pol.add_argument("--tbt-slo-ms", type=float, default=d.tbt_slo_ms, help="time-between-tokens target")
    pol.add_argument(
        "--latency-profile",
        default=d.latency_profile,
        help="profile JSON from `mnemosyne profile` (default: the cached one for this setup, else roofline)",
    )
    pol.add_argument("--long-prefill-threshold", type=int, default=d.long_prefill_threshold)
    pol.add_argument("--deadline-factor", type=float, default=d.deadline_factor)
    pol.add_argument("--min-deadline-s", type=float, default=d.min_deadline_s)
    pol.add_argument("--chunk-granularity", type=int, default=d.chunk_granularity)
    pol.add_argument("--min-chunk-tokens", type=int, default=d.min_chunk_tokens)


def engine_args_from(ns: argparse.Namespace) -> EngineArgs:
    """Every EngineArgs field has a same-named (dashed) CLI flag in add_engine_args."""
    values = {f.name: getattr(ns, f.name) for f in fields(EngineArgs)}
    if ns.model_tag is not None:
        if ns.model is not None and ns.model != ns.model_tag:
            raise ConfigError(f"two models given: {ns.model_tag!r} (positional) and --model {ns.model!r}")
        values["model"] = ns.model_tag
    return EngineArgs(**values)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "sampling (left-out fields: " + _FROM_GENERATION_CONFIG % "vLLM's defaults" + ")"
    )
    g.add_argument("--max-tokens", type=int, default=128, help="output tokens at most")
    g.add_argument("--min-tokens", type=int, default=0, help="output tokens before eos or a stop may end it")
    g.add_argument("--temperature", type=float, default=None, help="0: greedy (default: 1.0)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus mass (default: 1.0)")
    g.add_argument("--top-k", type=int, default=None, help="0 or -1: off (default: off)")
    g.add_argument("--min-p", type=float, default=None, help="(default: 0.0)")
    g.add_argument(
        "--repetition-penalty", type=float, default=None, help="HF's, over prompt and output (default: 1.0)"
    )
    g.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI's, over the output")
    g.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI's, over the output")
    g.add_argument("--sampling-seed", type=int, default=None, help="per-request sampling seed")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep going past end-of-sequence")


def sampling_params_from(ns: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=ns.max_tokens,
        min_tokens=ns.min_tokens,
        temperature=ns.temperature,
        top_p=ns.top_p,
        top_k=ns.top_k,
        min_p=ns.min_p,
        repetition_penalty=ns.repetition_penalty,
        frequency_penalty=ns.frequency_penalty,
        presence_penalty=ns.presence_penalty,
        seed=ns.sampling_seed,
        stop=ns.stop,
        ignore_eos=ns.ignore_eos,
    )


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
