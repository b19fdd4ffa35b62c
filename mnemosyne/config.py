"""Typed, frozen configuration objects.

Every component receives only the config it needs. `EngineConfig` bundles them
for the engine; nothing reads a global.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mnemosyne.config_policy import PolicyConfig
from mnemosyne.errors import ConfigError

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ConfigError(f"unsupported dtype {dtype}; use float32, bfloat16 or float16")
        return dtype
    if dtype not in _DTYPES:
        raise ConfigError(f"unsupported dtype {dtype!r}; use one of float32, bfloat16, float16")
    return _DTYPES[dtype]


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `kind` is one of "default", "linear", "llama3"."""

    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of a Llama-family decoder, parsed from an HF config.json."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2 always; others with attention_bias
    o_bias: bool  # attention_bias on Llama/Mistral/Qwen3 also biases o_proj
    qk_norm: bool  # Qwen3
    sliding_window: int | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    dtype: torch.dtype = torch.float32

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    @property
    def num_params(self) -> int:
        h, d = self.hidden_size, self.head_dim
        qkv = (self.num_heads + 2 * self.num_kv_heads) * d
        attn = h * qkv + self.num_heads * d * h
        attn += qkv * self.qkv_bias + h * self.o_bias + 2 * d * self.qk_norm
        mlp = 3 * h * self.intermediate_size
        per_layer = attn + mlp + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_layers * per_layer + h + head

    @property
    def weight_bytes(self) -> int:
        return self.num_params * self.dtype.itemsize

    @classmethod
    def from_hf_dict(cls, cfg: dict, dtype: torch.dtype) -> ModelConfig:
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"unsupported architecture {arch!r} (model_type={cfg.get('model_type')!r}); "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        num_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        head_dim = cfg.get("head_dim") or hidden // num_heads
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        sliding = cfg.get("sliding_window")
        if arch.startswith("Qwen") and not cfg.get("use_sliding_window", False):
            sliding = None
        return cls(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(_rope_theta(cfg)),
            rope_scaling=_parse_rope_scaling(cfg),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=arch == "Qwen2ForCausalLM" or bool(cfg.get("attention_bias")),
            o_bias=arch != "Qwen2ForCausalLM" and bool(cfg.get("attention_bias")),
            qk_norm=arch == "Qwen3ForCausalLM",
            sliding_window=int(sliding) if sliding else None,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            dtype=dtype,
        )

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, dtype: torch.dtype) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"model directory {model_dir} has no config.json")
        return cls.from_hf_dict(json.loads(path.read_text()), dtype)


def _rope_params(cfg: dict) -> dict:
    # transformers 5 moved rope settings into `rope_parameters`; 4.x used `rope_scaling`.
    return cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}


def _rope_theta(cfg: dict) -> float:
    return cfg.get("rope_theta") or _rope_params(cfg).get("rope_theta") or 10000.0


def _parse_rope_scaling(cfg: dict) -> RopeScaling:
    rs = _rope_params(cfg)
    kind = rs.get("rope_type") or rs.get("type") or "default"
    if kind not in ("default", "linear", "llama3"):
        raise ConfigError(f"unsupported rope scaling type {kind!r}; supported: default, linear, llama3")
    if kind == "default":
        return RopeScaling()
    return RopeScaling(
        kind=kind,
        factor=float(rs.get("factor", 1.0)),
        low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
        high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(rs.get("original_max_position_embeddings", 8192)),
    )


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache geometry.

    `num_blocks_per_group[g]` is the block count of KVP group g's pool.
    `max_tokens_per_kvp_group` bounds how many tokens of one request a group holds
    before the next group is onboarded. `enable_prefix_caching` reuses the full KV
    blocks of earlier requests with the same prefix (`kv_cache/block_hash.py`); the
    salt names the model so that no other model's KV ever matches. Off here so that
    low-level tests opt in; `EngineArgs` turns it on by default.
    """

    block_size: int
    num_blocks_per_group: tuple[int, ...]
    max_tokens_per_kvp_group: int | None = None
    enable_prefix_caching: bool = False
    prefix_cache_salt: str = ""


SM_SPLIT_GRANULE = 8  # green contexts split a Hopper GPU in multiples of 8 SMs


@dataclass(frozen=True)
class PrefillLaneConfig:
    """A long prompt's prefill in a lane of its own, beside the engine's steps (one device;
    engine/prefill_lane.py draws it). Sizes in tokens and SMs.

    On CUDA each lane chunk runs on a green context of all but S SMs, and the steps (decodes,
    short prompts) launched while it runs are confined to the S it leaves them, so neither
    waits for the other's thread blocks. S is chosen per chunk from the steps' predicted time
    (`BesideLaneLatencyModel.fewest_sms`): the fewest of `free_sms`, `free_sms` + 8, ..., `max_free_sms` whose
    decode step fits the TBT target; when none does but every SM would, the lane holds (its prompt
    prefills in the steps meanwhile). On CPU the lane is a thread sharing the cores (tests)."""

    free_sms: int = 16  # the fewest SMs the lane leaves the steps: a multiple of 8 (the driver's split granule)
    min_prompt_tokens: int = 65536  # prompt tokens left to prefill for a request to enter the lane
    chunk_tokens: int = 4096  # the lane's chunk size (large chunks run near their floor)
    max_free_sms: int | None = None  # the most SMs the lane leaves the steps; None: 2 x free_sms

    @property
    def steps_sms_choices(self) -> tuple[int, ...]:
        """The SM counts a lane chunk may leave the steps: multiples of 8 from `free_sms` up."""
        top = self.max_free_sms if self.max_free_sms is not None else 2 * self.free_sms
        return tuple(range(self.free_sms, top + 1, SM_SPLIT_GRANULE))

    def validate(self) -> None:
        if self.free_sms < SM_SPLIT_GRANULE or self.free_sms % SM_SPLIT_GRANULE:
            raise ConfigError(f"prefill_lane_free_sms must be a positive multiple of 8, got {self.free_sms}")
        top = self.max_free_sms
        if top is not None and (top < self.free_sms or top % SM_SPLIT_GRANULE):
            raise ConfigError(
                f"prefill_lane_max_free_sms must be a multiple of 8 and at least prefill_lane_free_sms "
                f"({self.free_sms}), got {top}"
            )
        if self.chunk_tokens < 1:
            raise ConfigError(f"prefill_lane_chunk_tokens must be >= 1, got {self.chunk_tokens}")
        if self.min_prompt_tokens < 2:
            raise ConfigError(f"prefill_lane_min_tokens must be >= 2, got {self.min_prompt_tokens}")

    @staticmethod
    def check_layout(tp: int, spp: int, kvp: int) -> None:
        """The lane runs on one device."""
        if tp * spp * kvp != 1:
            raise ConfigError(
                f"the prefill lane (--prefill-lane-free-sms) runs on one device; this layout has "
                f"{tp * spp * kvp} (tp={tp}, spp={spp}, kvp={kvp})"
            )


@dataclass(frozen=True)
class SchedulerConfig:
    max_model_len: int
    max_num_batched_tokens: int
    max_num_seqs: int = 256
    chunk_size: int | None = None  # None: whole remaining prompt, within the token budget
    # Schedule step n+1 while step n runs (a decode whose input token is still on the device;
    # see engine/decode_ahead.py). Only with spp == 1 (any tp, kvp); `EngineArgs` turns it off with stages.
    async_scheduling: bool = False
    prefill_lane: PrefillLaneConfig | None = None  # None: every chunk runs in the engine's steps


@dataclass(frozen=True)
class ParallelConfig:
    """The 3D layout (rank table in `parallel/groups.py`) and how its workers are run.

    `pipeline_depth` bounds the micro-batches in flight (None: spp, one per stage). With
    async scheduling (spp == 1) the engine keeps exactly two instead (engine/llm_engine.py).
    `driver_address` set: bind there and wait for externally launched workers
    (torchrun on several machines) instead of starting them locally.
    `timeout_s` bounds every collective (torch.distributed) and the driver's wait for one
    step's reply: it must exceed the longest legitimate step (a minutes-long chunk at 10M
    context). `heartbeat_timeout_s` is how long a worker may go without a heartbeat before
    it is declared frozen or lost (beats come from a thread, every second, during compute
    too), so a SIGSTOPped or hung rank is found in seconds, not after `timeout_s`.
    """

    tp: int = 1
    spp: int = 1
    kvp: int = 1
    pipeline_depth: int | None = None
    driver_address: str | None = None
    timeout_s: float = 600.0
    heartbeat_timeout_s: float = 10.0

    @property
    def world_size(self) -> int:
        return self.tp * self.spp * self.kvp

    @property
    def max_inflight(self) -> int:
        return self.pipeline_depth or self.spp

    def validate(self) -> None:
        """The layout's own sanity (what it needs from the model: `parallel/validate.py`)."""
        for name, size in (("tp", self.tp), ("spp", self.spp), ("kvp", self.kvp)):
            if size < 1:
                raise ConfigError(f"{name} must be >= 1, got {size}")
        if self.pipeline_depth is not None and self.pipeline_depth < 1:
            raise ConfigError(f"pipeline_depth must be >= 1, got {self.pipeline_depth}")
        if self.timeout_s <= 0:
            raise ConfigError(f"worker_timeout_s must be positive, got {self.timeout_s}")
        if not 3.0 <= self.heartbeat_timeout_s < self.timeout_s:
            raise ConfigError(
                f"heartbeat_timeout_s must be at least 3 s (three beats) and below worker_timeout_s "
                f"({self.timeout_s}), got {self.heartbeat_timeout_s}"
            )


class AttentionBackendKind(enum.Enum):
    """AUTO: the kernels (Triton + cuDNN) on CUDA, the torch reference on CPU. KERNELS on
    CPU runs the Triton kernels in the interpreter (TRITON_INTERPRET=1; tests only)."""

    AUTO = "auto"
    REFERENCE = "reference"
    KERNELS = "kernels"


class LoadFormat(enum.Enum):
    """SAFETENSORS: the checkpoint in the model directory. DUMMY: only config.json is read
    and every weight is drawn at random on the device (benchmarks of real shapes, no download)."""

    SAFETENSORS = "safetensors"
    DUMMY = "dummy"


class GenerationConfigMode(enum.Enum):
    """AUTO: sampling fields a request leaves out take the model's generation_config.json
    values (temperature, top_k, top_p, min_p, repetition_penalty). NONE: ignore that file."""

    AUTO = "auto"
    NONE = "none"


def parse_enum(kind: type[enum.Enum], value: str | enum.Enum, option: str):  # -> instance of kind
    if isinstance(value, kind):
        return value
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(m.value for m in kind)
        raise ConfigError(f"{option} must be one of {choices}; got {value!r}") from None


@dataclass(frozen=True)
class EngineConfig:
    model_dir: str
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    device: str = "cpu"
    seed: int = 0
    attention_backend: AttentionBackendKind = AttentionBackendKind.AUTO
    enforce_eager: bool = False  # True: no CUDA graphs (decode steps, piecewise mixed steps)
    load_format: LoadFormat = LoadFormat.SAFETENSORS
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    generation_config: GenerationConfigMode = GenerationConfigMode.AUTO
    chat_template: str | None = None  # overrides the tokenizer's (Jinja text)
    step_log: str | None = None  # write every step's chunks and times here (engine/step_log.py)

    def __post_init__(self) -> None:
        """One KVP count: the cache has one block pool per KVP group of the layout. A prefill
        lane only on one device."""
        if self.scheduler.prefill_lane is not None:
            PrefillLaneConfig.check_layout(self.parallel.tp, self.parallel.spp, self.parallel.kvp)
        if len(self.cache.num_blocks_per_group) != self.parallel.kvp:
            raise ConfigError(
                f"the KV cache has {len(self.cache.num_blocks_per_group)} group pools, "
                f"the layout kvp={self.parallel.kvp}"
            )

    @property
    def max_inflight(self) -> int:
        """Steps the engine (and the simulator) keeps in flight: two with async scheduling
        (step n+1 is planned while n runs; a decode ahead's input is sampled by the plan just
        before it, and the workers keep only that plan's samples: worker/decode_ahead.py),
        else a pipeline's micro-batches (`parallel.max_inflight`)."""
        return 2 if self.scheduler.async_scheduling else self.parallel.max_inflight
