"""Argument groups shared by the commands (`mnemosyne generate`, `serve`, `profile`,
`simulate`, `bench ...`): the engine's flags, the scheduling policy's, sampling, and the help
formatter. The command modules import these; `cli.py` wires the commands together."""

from __future__ import annotations

import argparse
from dataclasses import fields

from mnemosyne.config import AttentionBackendKind, GenerationConfigMode, LoadFormat
from mnemosyne.config_policy import ChunkPolicyKind, SchedulingPolicyKind
from mnemosyne.engine.args import EngineArgs
from mnemosyne.errors import ConfigError
from mnemosyne.sampling_params import SamplingParams

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
    g.add_argument(
        "--step-log", default=d.step_log, metavar="FILE",
        help="write every step (its chunks, predicted and measured seconds) to FILE as JSON lines",
    )  # fmt: skip
    g.add_argument(
        "--chunk-size", type=int, default=d.chunk_size,
        help="prefill chunk tokens of the fixed chunk policy (giving it selects that policy; default 512)",
    )  # fmt: skip
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
    g.add_argument(
        "--enforce-eager", action="store_true", help="no CUDA graphs (decode steps and piecewise mixed steps)"
    )
    g.add_argument(
        "--load-format",
        default=d.load_format,
        choices=[k.value for k in LoadFormat],
        help="dummy: random weights from config.json alone (benchmarks)",
    )
    add_policy_args(p, d)
    add_prefill_lane_args(p, d)
    g.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=d.enable_prefix_caching,
        help="reuse the KV of full blocks shared with earlier requests' prefixes (default: on)",
    )
    g.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=d.async_scheduling,
        help="schedule step n+1 while the devices run step n (default: on; one device or any "
        "tp x kvp layout, a no-op with spp > 1)",
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


def add_prefill_lane_args(p: argparse.ArgumentParser, d: EngineArgs) -> None:
    """The prefill lane's options (`serve`, `generate`, `simulate`)."""
    lane = p.add_argument_group("prefill lane (one device)")
    lane.add_argument(
        "--prefill-lane-free-sms", type=int, default=d.prefill_lane_free_sms, metavar="N",
        help="N > 0 (a multiple of 8): a long prompt prefills in large chunks in a lane of its own, "
        "beside the steps of every other request, which each chunk leaves N to --prefill-lane-max-free-sms "
        "SMs (chosen from their predicted time); 0: every chunk runs in the engine's steps",
    )  # fmt: skip
    lane.add_argument(
        "--prefill-lane-max-free-sms", type=int, default=d.prefill_lane_max_free_sms, metavar="M",
        help="the most SMs a lane chunk leaves the steps (a multiple of 8; default 2 x N)",
    )  # fmt: skip
    lane.add_argument(
        "--prefill-lane-min-tokens", type=int, default=d.prefill_lane_min_tokens,
        help="prompt tokens left to prefill for a request to enter the lane",
    )  # fmt: skip
    lane.add_argument(
        "--prefill-lane-chunk-tokens", type=int, default=d.prefill_lane_chunk_tokens,
        help="the lane's chunk size",
    )  # fmt: skip


def add_policy_args(p: argparse.ArgumentParser, d: EngineArgs) -> None:
    pol = p.add_argument_group("scheduling policy (chunk sizes and order)")
    pol.add_argument(
        "--chunk-policy",
        default=d.chunk_policy,
        choices=[k.value for k in ChunkPolicyKind],
        help="fixed: --chunk-size; adaptive: the largest chunk whose predicted step time fits --tbt-slo-ms. "
        "Default: fixed with --chunk-size or on CPU, else adaptive",
    )
    pol.add_argument(
        "--scheduling-policy",
        default=d.scheduling_policy,
        choices=[k.value for k in SchedulingPolicyKind],
        help="fcfs: by arrival; lars: least relative slack first, with space sharing for long prefills. "
        "Default: lars with adaptive chunks, fcfs with fixed ones",
    )
    pol.add_argument("--tbt-slo-ms", type=float, default=d.tbt_slo_ms, help="time-between-tokens target")
    pol.add_argument(
        "--prefill-only-step-ms", type=float, default=d.prefill_only_step_ms,
        help="adaptive: step-time target of a step with no decode (no token gap to protect)",
    )  # fmt: skip
    pol.add_argument(
        "--latency-profile",
        default=d.latency_profile,
        help="profile JSON from `mnemosyne profile` (default: the cached one for this setup, else roofline)",
    )
    pol.add_argument("--long-prefill-threshold", type=int, default=d.long_prefill_threshold)
    pol.add_argument("--deadline-factor", type=float, default=d.deadline_factor)
    pol.add_argument("--min-deadline-s", type=float, default=d.min_deadline_s)
    pol.add_argument("--chunk-granularity", type=int, default=d.chunk_granularity)
    pol.add_argument(
        "--min-chunk-tokens", type=int, default=d.min_chunk_tokens,
        help="adaptive: a prefill's progress when even a 16-token chunk would overshoot the target",
    )  # fmt: skip
    pol.add_argument(
        "--online-calibration", action=argparse.BooleanOptionalAction, default=d.online_calibration,
        help="adaptive: correct the latency model's predictions from the run's measured step times",
    )  # fmt: skip
    pol.add_argument(
        "--tbt-slo-quantile", type=float, default=d.tbt_slo_quantile,
        help="adaptive, with online calibration: about this fraction of full-budget steps lands within "
        "--tbt-slo-ms (higher: a shorter TBT tail, smaller chunks, a later first token for long prompts)",
    )  # fmt: skip
    pol.add_argument(
        "--graph-sized-steps", action=argparse.BooleanOptionalAction, default=d.graph_sized_steps,
        help="adaptive, on a GPU: while requests decode, no step holds more tokens than the largest "
        "CUDA-graph step (larger steps run eagerly and overshoot their predicted time more often)",
    )  # fmt: skip


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
