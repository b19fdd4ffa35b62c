"""User-facing engine options, and how they become the frozen EngineConfig."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mnemosyne.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, parse_dtype
from mnemosyne.errors import ConfigError
from mnemosyne.models.loader import check_model_dir

_DEFAULT_CPU_KV_GB = 2.0
_CUDA_RESERVE_BYTES = 1 << 30  # allocator fragmentation, CUDA context growth, sampler buffers


@dataclass(frozen=True)
class EngineArgs:
    model: str | None = None  # local HF directory; None = embedded SmolLM2-135M-Instruct
    dtype: str | torch.dtype = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"  # auto: cuda if available
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    block_size: int = 16
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    chunk_size: int | None = 512
    kv_cache_memory_gb: float | None = None
    kv_cache_memory_fraction: float = 0.85  # of free device memory, CUDA only
    seed: int = 0

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
        if not 0 < self.kv_cache_memory_fraction <= 1:
            raise ConfigError(
                f"kv_cache_memory_fraction must be in (0, 1], got {self.kv_cache_memory_fraction}"
            )

    def create_engine_config(self) -> EngineConfig:
        """Resolve defaults. KV capacity: kv_cache_memory_gb if set; otherwise a fraction
        of the CUDA memory left free once the weights and an activation reserve are
        subtracted, or 2 GiB on CPU."""
        self.validate()
        device = self.resolve_device()
        dtype = self.resolve_dtype(device)
        model_dir = self.resolve_model_dir(dtype)
        model_cfg = ModelConfig.from_pretrained(model_dir, dtype)
        max_model_len = self.max_model_len or model_cfg.max_position_embeddings
        if max_model_len <= 0:
            raise ConfigError(f"max_model_len must be positive, got {max_model_len}")
        bytes_per_block = self.block_size * model_cfg.kv_bytes_per_token
        budget = self._kv_budget_bytes(device, model_cfg)
        num_blocks = int(budget // bytes_per_block)
        if num_blocks < 1:
            raise ConfigError(
                f"KV cache budget of {budget / 2**30:.3f} GiB holds no block of {bytes_per_block} bytes "
                f"(block_size {self.block_size} x {model_cfg.kv_bytes_per_token} bytes/token)"
            )
        return EngineConfig(
            model_dir=str(model_dir),
            model=model_cfg,
            cache=CacheConfig(block_size=self.block_size, num_blocks_per_group=(num_blocks,)),
            scheduler=SchedulerConfig(
                max_model_len=max_model_len,
                max_num_batched_tokens=self.max_num_batched_tokens,
                max_num_seqs=self.max_num_seqs,
                chunk_size=self.chunk_size,
            ),
            device=device,
            seed=self.seed,
        )

    def _kv_budget_bytes(self, device: str, model_cfg: ModelConfig) -> float:
        if self.kv_cache_memory_gb is not None:
            return self.kv_cache_memory_gb * 2**30
        if device.startswith("cuda"):
            free, _total = torch.cuda.mem_get_info(torch.device(device))
            # Activations of one step: a few hidden-sized buffers, the MLP, float32 logits rows.
            per_token = 4 * (4 * model_cfg.hidden_size + 3 * model_cfg.intermediate_size)
            reserve = self.max_num_batched_tokens * per_token + _CUDA_RESERVE_BYTES
            return max(0.0, free - model_cfg.weight_bytes - reserve) * self.kv_cache_memory_fraction
        return _DEFAULT_CPU_KV_GB * 2**30
