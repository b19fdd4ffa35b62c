"""Which attention backend a worker uses (`AttentionBackendKind`)."""

from __future__ import annotations

import os

import torch

from mnemosyne.config import AttentionBackendKind, ModelConfig
from mnemosyne.errors import ConfigError
from mnemosyne.layers.attention.backend import AttentionBackend
from mnemosyne.layers.attention.reference import TorchReferenceBackend
from mnemosyne.layers.linear import num_kv_heads_per_rank


def make_attention_backend(
    kind: AttentionBackendKind, cfg: ModelConfig, tp: int, device: torch.device
) -> AttentionBackend:
    """AUTO: kernels on CUDA, the reference elsewhere. Kernels on CPU need the Triton
    interpreter (TRITON_INTERPRET=1 before the kernels are imported)."""
    use_kernels = kind == AttentionBackendKind.KERNELS or (
        kind == AttentionBackendKind.AUTO and device.type == "cuda"
    )
    if not use_kernels:
        return TorchReferenceBackend()
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(
            f"attention_backend=kernels on {device.type} needs TRITON_INTERPRET=1 (Triton's interpreter)"
        )
    from mnemosyne.layers.attention.kernel_backend import KernelBackend

    num_heads_per_kv = (cfg.num_heads // tp) // num_kv_heads_per_rank(cfg.num_kv_heads, tp)
    return KernelBackend(num_heads_per_kv, cfg.head_dim, cfg.dtype, device)
