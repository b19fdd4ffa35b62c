"""User-facing engine options, and how they become the frozen EngineConfig."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mnemosyne.config import (
    AttentionBackendKind,
    CacheConfig,
    EngineConfig,
    GenerationConfigMode,
    LoadFormat,
    ModelConfig,
    ParallelConfig,
    PrefillLaneConfig,
    SchedulerConfig,
    parse_dtype,
    parse_enum,
)
from mnemosyne.config_policy import ChunkPolicyKind, PolicyConfig, SchedulingPolicyKind
from mnemosyne.errors import ConfigError
from mnemosyne.kernels import DENSE_SEGMENT_TOKENS
from mnemosyne.layers.linear import num_kv_heads_per_rank
from mnemosyne.models.loader import check_model_dir
from mnemosyne.parallel.groups import stage_layers
from mnemosyne.worker.piecewise_graph import MAX_PIECEWISE_TOKENS, max_piecewise_step_tokens

_DEFAULT_CPU_KV_GB = 2.0
_CUDA_RESERVE_BYTES = 1 << 30  # allocator fragmentation, CUDA context growth, sampler buffers


# Tokens per KV-cache block: a multiple of 64, so the chunk kernel walks page-aligned steps
# (kernels/chunk_tma_attention.py: TMA on sm_90).
DEFAULT_BLOCK_SIZE = 64


@dataclass(frozen=True)
class EngineArgs:
    model: str | None = None  # local HF directory; None = embedded SmolLM2-135M-Instruct
    dtype: str | torch.dtype = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"  # auto: cuda if available
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    allow_long_max_model_len: bool = False  # allow max_model_len above max_position_embeddings
    block_size: int = DEFAULT_BLOCK_SIZE
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    chunk_size: int | None = None  # fixed chunks' cap; None: DEFAULT_CHUNK_TOKENS (and see default_policies)
    kv_cache_memory_gb: float | None = None
    kv_cache_memory_fraction: float = 0.85  # of free device memory, CUDA only
    gpu_memory_utilization: float | None = None  # vLLM's: fraction of total GPU memory for weights + KV
    seed: int = 0
    tp: int = 1  # tensor-parallel ranks per pipeline stage
    spp: int = 1  # sequence-pipeline stages
    kvp: int = 1  # KV-cache-parallel groups (model replicas holding disjoint KV ranges)
    max_tokens_per_kvp_group: int | None = None  # default with kvp > 1: one group's whole capacity
    pipeline_depth: int | None = None  # micro-batches in flight; default spp
    driver_address: str | None = None  # e.g. tcp://0.0.0.0:5570: wait for torchrun-launched workers
    worker_timeout_s: float = 600.0  # collectives and one step's reply: above the longest step
    heartbeat_timeout_s: float = 10.0  # a worker silent this long is frozen or lost
    attention_backend: str | AttentionBackendKind = "auto"  # auto | reference | kernels
    enforce_eager: bool = False  # no CUDA graphs (decode, piecewise)
    load_format: str | LoadFormat = "safetensors"  # safetensors | dummy (random weights, config.json only)
    # ---- chunk sizing and ordering (PolicyConfig) ----
    # fixed (chunk_size) | adaptive (latency model, tbt_slo_ms); None: default_policies()
    chunk_policy: str | ChunkPolicyKind | None = None
    # fcfs | lars (least relative slack, space sharing); None: default_policies()
    scheduling_policy: str | SchedulingPolicyKind | None = None
    tbt_slo_ms: float = 30.0  # step-time target of adaptive chunking
    prefill_only_step_ms: float = 100.0  # adaptive chunking's target for steps with no decode
    latency_profile: str | None = None  # profile JSON; None: cached profile for this setup, else roofline
    long_prefill_threshold: int = 262144  # tokens processed past which a prefill is long (space sharing)
    deadline_factor: float = 1.5  # LARS deadline = max(factor * predicted prefill time, min_deadline_s)
    min_deadline_s: float = 0.5
    chunk_granularity: int = 32  # adaptive chunks are multiples of this (or a prompt's remainder)
    min_chunk_tokens: int = 32  # the first prefill of a step always gets at least this
    online_calibration: bool = True  # adaptive: correct the latency model from measured step times
    tbt_slo_quantile: float = 0.98  # adaptive: about this fraction of full-budget steps within tbt_slo_ms
    graph_sized_steps: bool = True  # adaptive: while requests decode, no step larger than the CUDA graphs
    enable_prefix_caching: bool = True  # reuse the KV of full blocks of earlier requests' prefixes
    async_scheduling: bool = True  # prepare step n+1 while step n runs (spp == 1 layouts; a no-op with spp > 1)
    generation_config: str | GenerationConfigMode = "auto"  # auto: the model's sampling defaults | none
    chat_template: str | None = None  # a Jinja file (or the template itself) instead of the tokenizer's
    step_log: str | None = None  # a JSON-lines file: every step's chunks, predicted and measured time
    # ---- the prefill lane (PrefillLaneConfig; one device) ----
    prefill_lane_free_sms: int = 0  # > 0: long prompts prefill in a lane leaving the steps at least this many SMs; 0: off
    prefill_lane_min_tokens: int = 65536  # prompt tokens left for a request to enter the lane
    prefill_lane_chunk_tokens: int = 4096  # the lane's chunk size
    prefill_lane_max_free_sms: int | None = None  # the most SMs a lane chunk leaves the steps; None: 2 x free

    def resolve_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device {self.device!r} requested but CUDA is not available")
        return self.device

    def resolve_dtype(self, device: str) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if device.startswith("cuda") else torch.float32
        return parse_dtype(self.dtype)

    def resolve_model_dir(self, dtype: torch.dtype) -> Path:
        if self.model is None:
            from mnemosyne.models.default_model import resolve_default_model

            return resolve_default_model(dtype)
        return check_model_dir(self.model)

    def validate(self) -> None:
        if self.block_size <= 0:
            raise ConfigError(f"block_size must be positive, got {self.block_size}")
        if self.max_num_batched_tokens <= 0:
            raise ConfigError(f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}")
        if self.chunk_size is not None and self.chunk_size <= 0:
            raise ConfigError(f"chunk_size must be positive, got {self.chunk_size}")
        if self.max_num_seqs <= 0:
            raise ConfigError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.kv_cache_memory_gb is not None and self.kv_cache_memory_gb <= 0:
            raise ConfigError(f"kv_cache_memory_gb must be positive, got {self.kv_cache_memory_gb}")
        self.parallel_config().validate()
        parse_enum(AttentionBackendKind, self.attention_backend, "attention_backend")
        parse_enum(LoadFormat, self.load_format, "load_format")
        self.policy_config(self.resolve_device()).validate()
        parse_enum(GenerationConfigMode, self.generation_config, "generation_config")
        if self.gpu_memory_utilization is not None:
            if not 0 < self.gpu_memory_utilization <= 1:
                raise ConfigError(
                    f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
                )
            if self.kv_cache_memory_gb is not None:
                raise ConfigError("give gpu_memory_utilization or kv_cache_memory_gb, not both")
        lane = self.prefill_lane_config()
        if lane is not None:
            lane.validate()
            lane.check_layout(self.tp, self.spp, self.kvp)
        if not 0 < self.kv_cache_memory_fraction <= 1:
            raise ConfigError(
                f"kv_cache_memory_fraction must be in (0, 1], got {self.kv_cache_memory_fraction}"
            )

    def policy_config(self, device: str) -> PolicyConfig:
        """`device`: the resolved device ("cpu", "cuda...", or "simulated" for the simulator's GPUs)."""
        named = None  # a chunk policy given picks its scheduling default too
        if self.chunk_policy is not None:
            named = parse_enum(ChunkPolicyKind, self.chunk_policy, "chunk_policy")
        chunk, scheduling = default_policies(device, self.chunk_size, named)
        if self.scheduling_policy is not None:
            scheduling = parse_enum(SchedulingPolicyKind, self.scheduling_policy, "scheduling_policy")
        return PolicyConfig(
            chunk_policy=chunk,
            scheduling_policy=scheduling,
            tbt_slo_s=self.tbt_slo_ms / 1000.0,
            prefill_only_step_s=self.prefill_only_step_ms / 1000.0,
            latency_profile=self.latency_profile,
            long_prefill_threshold_tokens=self.long_prefill_threshold,
            deadline_factor=self.deadline_factor,
            min_deadline_s=self.min_deadline_s,
            chunk_granularity_tokens=self.chunk_granularity,
            min_chunk_tokens=self.min_chunk_tokens,
            online_calibration=self.online_calibration,
            tbt_slo_quantile=self.tbt_slo_quantile,
            max_decoding_step_tokens=max_decoding_step_tokens(
                device, self.enforce_eager, self.max_num_batched_tokens, self.graph_sized_steps
            ),
        )

    def parallel_config(self) -> ParallelConfig:
        return ParallelConfig(
            tp=self.tp,
            spp=self.spp,
            kvp=self.kvp,
            pipeline_depth=self.pipeline_depth,
            driver_address=self.driver_address,
            timeout_s=self.worker_timeout_s,
            heartbeat_timeout_s=self.heartbeat_timeout_s,
        )

    def create_engine_config(self) -> EngineConfig:
        """Resolve defaults and check the layout (before any worker starts).

        KV capacity, per device: kv_cache_memory_gb if set; otherwise on CUDA a
        fraction of the memory left free once this device's weight shard and an
        activation reserve are subtracted, and on CPU 2 GiB split over the devices.
        Every KVP group gets the same number of blocks."""
        self.validate()
        device = self.resolve_device()
        dtype = self.resolve_dtype(device)
        model_dir = self.resolve_model_dir(dtype)
        model_cfg = ModelConfig.from_pretrained(model_dir, dtype)
        parallel = self.parallel_config()
        from mnemosyne.parallel.validate import check_layout

        local_devices = torch.cuda.device_count() if device.startswith("cuda") else None
        check_layout(model_cfg, parallel, None if self.driver_address else local_devices)
        budget = self._kv_budget_bytes(device, model_cfg, parallel)
        return self.engine_config_for(model_dir, model_cfg, device, budget)

    def engine_config_for(
        self, model_dir: str | Path, model_cfg: ModelConfig, device: str, kv_budget_bytes: float
    ) -> EngineConfig:
        """The EngineConfig for a resolved model and a per-device KV budget (no device is
        touched: the simulator builds its engine with this)."""
        parallel = self.parallel_config()
        max_model_len = self.max_model_len or model_cfg.max_position_embeddings
        if max_model_len <= 0:
            raise ConfigError(f"max_model_len must be positive, got {max_model_len}")
        if max_model_len > model_cfg.max_position_embeddings and not self.allow_long_max_model_len:
            raise ConfigError(
                f"max_model_len {max_model_len} is above the model's limit of "
                f"{model_cfg.max_position_embeddings} tokens (max_position_embeddings in config.json); "
                f"positions beyond it were never trained. Pass --allow-long-max-model-len to use it anyway"
            )
        bytes_per_block = self.block_size * kv_bytes_per_token_per_device(model_cfg, parallel)
        num_blocks = int(kv_budget_bytes // bytes_per_block)
        if num_blocks < 1:
            raise ConfigError(
                f"KV cache budget of {kv_budget_bytes / 2**30:.3f} GiB per device holds no block of "
                f"{bytes_per_block} bytes (block_size {self.block_size})"
            )
        max_tokens_per_kvp_group = self.max_tokens_per_kvp_group
        if max_tokens_per_kvp_group is None and self.kvp > 1:
            max_tokens_per_kvp_group = num_blocks * self.block_size
        return EngineConfig(
            model_dir=str(model_dir),
            model=model_cfg,
            cache=CacheConfig(
                block_size=self.block_size,
                num_blocks_per_group=(num_blocks,) * self.kvp,
                max_tokens_per_kvp_group=max_tokens_per_kvp_group,
                enable_prefix_caching=self.enable_prefix_caching,
                prefix_cache_salt=f"{model_dir}|{model_cfg.dtype}|{self.load_format}|{self.seed}",
            ),
            scheduler=SchedulerConfig(
                max_model_len=max_model_len,
                max_num_batched_tokens=self.max_num_batched_tokens,
                max_num_seqs=self.max_num_seqs,
                chunk_size=self.chunk_size or DEFAULT_CHUNK_TOKENS,
                # Any tp x kvp, local or torchrun workers (decode-ahead inputs: one all-reduce
                # per plan, worker/decode_ahead.py); a pipeline keeps its micro-batches in flight.
                async_scheduling=self.async_scheduling and parallel.spp == 1,
                prefill_lane=self.prefill_lane_config(),
            ),
            parallel=parallel,
            device=device,
            seed=self.seed,
            attention_backend=parse_enum(AttentionBackendKind, self.attention_backend, "attention_backend"),
            enforce_eager=self.enforce_eager,
            load_format=parse_enum(LoadFormat, self.load_format, "load_format"),
            policy=self.policy_config(device),
            generation_config=parse_enum(GenerationConfigMode, self.generation_config, "generation_config"),
            chat_template=read_chat_template(self.chat_template),
            step_log=self.step_log,
        )

    def prefill_lane_config(self) -> PrefillLaneConfig | None:
        if self.prefill_lane_free_sms == 0:
            return None
        return PrefillLaneConfig(
            self.prefill_lane_free_sms,
            self.prefill_lane_min_tokens,
            self.prefill_lane_chunk_tokens,
            self.prefill_lane_max_free_sms,
        )

    def _kv_budget_bytes(self, device: str, model_cfg: ModelConfig, parallel: ParallelConfig) -> float:
        if self.kv_cache_memory_gb is not None:
            return self.kv_cache_memory_gb * 2**30
        if device.startswith("cuda"):
            num_local = min(parallel.world_size, torch.cuda.device_count())
            infos = [torch.cuda.mem_get_info(torch.device("cuda", i)) for i in range(num_local)]
            free, total = min(f for f, _ in infos), min(t for _, t in infos)
            # Activations of one step: a few hidden-sized buffers, the MLP, float32 logits rows.
            per_token = 4 * (4 * model_cfg.hidden_size + 3 * model_cfg.intermediate_size)
            reserve = self.max_num_batched_tokens * per_token + _CUDA_RESERVE_BYTES
            lane = self.prefill_lane_config()
            if lane is not None:  # each split's lane stream and steps' stream keep a pool
                lane_step_tokens = self.prefill_lane_chunk_tokens + self.max_num_batched_tokens
                reserve += len(lane.steps_sms_choices) * lane_step_tokens * per_token
            # The CUDA graphs' own pool: activations of the largest graph step (piecewise or mixed).
            if not self.enforce_eager:
                reserve += min(self.max_num_batched_tokens, MAX_PIECEWISE_TOKENS) * per_token
            # Kernel temporaries: a gathered K/V segment of the cuDNN prefill path per layer.
            reserve += 2 * DENSE_SEGMENT_TOKENS * model_cfg.num_kv_heads * model_cfg.head_dim * 2
            weights = weight_bytes_per_device(model_cfg, parallel)
            if self.gpu_memory_utilization is not None:
                return kv_budget_from_utilization(
                    self.gpu_memory_utilization, free, total, weights + reserve
                )
            return max(0.0, free - weights - reserve) * self.kv_cache_memory_fraction
        if self.gpu_memory_utilization is not None:
            raise ConfigError(
                "gpu_memory_utilization applies to CUDA devices; on CPU set kv_cache_memory_gb"
            )
        return _DEFAULT_CPU_KV_GB * 2**30 / parallel.world_size


def kv_budget_from_utilization(utilization: float, free: int, total: int, non_kv: int) -> float:
    """vLLM's --gpu-memory-utilization: this engine may use `utilization * total` bytes of
    each device for weights, activations and KV (`non_kv` is all but the KV); the KV cache
    gets the rest. Refused when that much is not free at start-up."""
    requested = utilization * total
    gib = 2**30
    if requested > free:
        raise ConfigError(
            f"gpu_memory_utilization {utilization} asks for {requested / gib:.2f} GiB of "
            f"{total / gib:.2f} GiB per device but only {free / gib:.2f} GiB are free: lower it"
        )
    if requested <= non_kv:
        raise ConfigError(
            f"gpu_memory_utilization {utilization} ({requested / gib:.2f} GiB) leaves no room for the "
            f"KV cache after {non_kv / gib:.2f} GiB of weights and activations: raise it"
        )
    return requested - non_kv


def read_chat_template(template: str | None) -> str | None:
    """A chat template given as a file path, or inline (a string containing '{%' or '{{')."""
    if template is None:
        return None
    path = Path(template).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if "{%" in template or "{{" in template:
        return template
    raise ConfigError(f"chat template file {template!r} does not exist")


def _num_layers_longest_stage(model_cfg: ModelConfig, parallel: ParallelConfig) -> int:
    return len(stage_layers(model_cfg.num_layers, parallel.spp, 0))  # stage 0 is never shorter


def kv_bytes_per_token_per_device(model_cfg: ModelConfig, parallel: ParallelConfig) -> int:
    """KV bytes one token costs on the busiest device: the first (longest) stage's layers,
    this rank's KV heads (one replicated head when tp > num_kv_heads)."""
    num_layers = _num_layers_longest_stage(model_cfg, parallel)
    num_kv_heads = num_kv_heads_per_rank(model_cfg.num_kv_heads, parallel.tp)
    return 2 * num_layers * num_kv_heads * model_cfg.head_dim * model_cfg.dtype.itemsize


DEFAULT_CHUNK_TOKENS = 512  # the fixed policy's chunk when none is given


def default_policies(
    device: str, chunk_size: int | None, chunk_policy: ChunkPolicyKind | None = None
) -> tuple[ChunkPolicyKind, SchedulingPolicyKind]:
    """The chunk and scheduling policies an engine gets when it names none.

        chunk policy       given, else FIXED if a chunk_size is given (a chunk size asked for is
                           kept), else ADAPTIVE on a GPU and FIXED (DEFAULT_CHUNK_TOKENS) on CPU
        scheduling policy  LARS with ADAPTIVE chunks, FCFS with FIXED ones

    Why (benchmarks/results/README.md, "Seventh session"): on one H200, in 300-s serving
    traces of short and 64K-512K-token requests, adaptive chunks with LARS kept 98% (8B) and
    96% (1B) of token gaps within 30 ms, against 90% / 82% with fixed 2048-token chunks
    (whose p99 gap was 0.87 s / 0.55 s), at the same throughput; they cost the longest
    prompts up to 2x in TTFT. Adaptive chunks need LARS: with FCFS order a long prefill takes
    every step's chunk budget and short prompts wait behind it (simulated: short TTFT p99
    20-30 s). On CPU no step of even the default model fits a 30 ms target, so adaptive chunks
    would only shrink prefills (22% slower on a small batch: cpu_default_policies), hence FIXED there.
    "simulated" (the simulator's device) is a GPU."""
    if chunk_policy is None:
        on_cpu = device.startswith("cpu")
        chunk_policy = ChunkPolicyKind.FIXED if chunk_size is not None or on_cpu else ChunkPolicyKind.ADAPTIVE
    lars = chunk_policy is ChunkPolicyKind.ADAPTIVE
    return chunk_policy, SchedulingPolicyKind.LARS if lars else SchedulingPolicyKind.FCFS


def max_decoding_step_tokens(
    device: str, enforce_eager: bool, max_num_batched_tokens: int, graph_sized_steps: bool = True
) -> int | None:
    """PolicyConfig.max_decoding_step_tokens: the piecewise graphs' largest step where they run
    (a GPU without enforce_eager, or the simulator's "simulated" GPU), else None (no cap)."""
    if not graph_sized_steps or enforce_eager or device.startswith("cpu"):
        return None
    return max_piecewise_step_tokens(max_num_batched_tokens)


def weight_bytes_per_device(model_cfg: ModelConfig, parallel: ParallelConfig) -> int:
    """An upper bound on one device's weight shard: the longest stage plus embedding and head."""
    h, v = model_cfg.hidden_size, model_cfg.vocab_size
    embed_and_head = v * h * (1 if model_cfg.tie_word_embeddings and parallel.spp == 1 else 2)
    per_layer = (
        model_cfg.num_params - v * h * (1 if model_cfg.tie_word_embeddings else 2)
    ) / model_cfg.num_layers
    num_layers = _num_layers_longest_stage(model_cfg, parallel)
    return int((per_layer * num_layers + embed_and_head) / parallel.tp * model_cfg.dtype.itemsize)
