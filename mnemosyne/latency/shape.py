"""The model shape and the 3D layout a latency prediction is for (plain data, no torch)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from mnemosyne.kernels.host_math import chunk_tile_tokens


@dataclass(frozen=True)
class ModelShape:
    """What sets a step's bytes and FLOPs: the decoder's dimensions and the activation dtype size."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    dtype_bytes: int

    @classmethod
    def from_model_config(cls, cfg: Any) -> ModelShape:
        """From a `mnemosyne.config.ModelConfig` (duck-typed so this module stays torch-free)."""
        return cls(
            num_layers=cfg.num_layers,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_heads=cfg.num_heads,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            vocab_size=cfg.vocab_size,
            dtype_bytes=cfg.dtype.itemsize,
        )

    @property
    def params_per_layer(self) -> int:
        h, d = self.hidden_size, self.head_dim
        attn = h * (self.num_heads + 2 * self.num_kv_heads) * d + self.num_heads * d * h
        return attn + 3 * h * self.intermediate_size

    @property
    def chunk_tile_tokens(self) -> int:
        """Query tokens per tile of the CUDA chunk kernels for these heads and dtype."""
        return chunk_tile_tokens(self.num_heads // self.num_kv_heads, self.dtype_bytes)

    @property
    def kv_bytes_per_token_per_layer(self) -> int:
        return 2 * self.num_kv_heads * self.head_dim * self.dtype_bytes

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class Layout:
    """tp x spp x kvp (see `parallel/groups.py`)."""

    tp: int = 1
    spp: int = 1
    kvp: int = 1

    def to_dict(self) -> dict[str, int]:
        return asdict(self)
