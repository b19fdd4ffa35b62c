"""How chunks are sized and ordered: `PolicyConfig` and the policy kinds it names.

`EngineArgs.policy_config` fills one in, `EngineConfig.policy` holds it (config.py), and
engine/policies.py builds the scheduler's chunk and priority policies from it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from mnemosyne.errors import ConfigError


class ChunkPolicyKind(enum.Enum):
    """FIXED: at most `chunk_size` tokens per chunk. ADAPTIVE: the largest chunk whose predicted
    step time stays within the TBT target (`engine/adaptive_chunking.py`)."""

    FIXED = "fixed"
    ADAPTIVE = "adaptive"


class SchedulingPolicyKind(enum.Enum):
    """FCFS: by arrival. LARS: least relative slack first, with space sharing (`engine/priority.py`)."""

    FCFS = "fcfs"
    LARS = "lars"


@dataclass(frozen=True)
class PolicyConfig:
    """How chunks are sized and ordered. Times in seconds, sizes in tokens."""

    chunk_policy: ChunkPolicyKind = ChunkPolicyKind.FIXED
    scheduling_policy: SchedulingPolicyKind = SchedulingPolicyKind.FCFS
    tbt_slo_s: float = 0.030  # step-time target of adaptive chunking while requests decode
    prefill_only_step_s: float = 0.100  # its target for a step when no request decodes
    latency_profile: str | None = None  # None: the cached profile matching this setup, else the roofline
    long_prefill_threshold_tokens: int = 262144  # processed tokens past which a prefill is "long"
    deadline_factor: float = 1.5  # LARS deadline = max(factor * predicted prefill, min_deadline_s)
    min_deadline_s: float = 0.5
    # Adaptive chunks are multiples of this (or a prompt's remainder). 32 tokens = one 128-row
    # query tile of the chunk kernel at GQA 4: on an H200 (8B, after 240K keys) 48 tokens cost
    # what 64 do, and with a model linear in c 16-token granules took 70.0 s against 68.9 s for
    # the mixed scenario's 256K prompt (benchmarks/results/session20_h200_2026-12-01/a/); the
    # model now prices chunks by whole tiles (latency/fitted.py), so finer granules gain nothing
    chunk_granularity_tokens: int = 32
    min_chunk_tokens: int = 32  # progress of the first prefill of a step even over the target
    online_calibration: bool = True  # correct the latency model from measured step times (adaptive)
    # The quantile of measured / predicted step times the correction applies: about this
    # fraction of full-budget steps lands within tbt_slo_s (higher: a shorter tail, smaller chunks)
    tbt_slo_quantile: float = 0.98
    # Adaptive: while requests decode, a step holds at most this many tokens (the largest
    # piecewise CUDA-graph step; larger steps run eagerly, with a long TBT tail). None: no cap
    max_decoding_step_tokens: int | None = None

    def validate(self) -> None:
        for name in ("tbt_slo_s", "prefill_only_step_s", "deadline_factor"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.min_deadline_s < 0:
            raise ConfigError(f"min_deadline_s must be >= 0, got {self.min_deadline_s}")
        if not 0.5 <= self.tbt_slo_quantile <= 1.0:
            raise ConfigError(f"tbt_slo_quantile must be in [0.5, 1], got {self.tbt_slo_quantile}")
        for name in ("long_prefill_threshold_tokens", "chunk_granularity_tokens", "min_chunk_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_decoding_step_tokens is not None and self.max_decoding_step_tokens < 1:
            raise ConfigError(f"max_decoding_step_tokens must be >= 1, got {self.max_decoding_step_tokens}")
