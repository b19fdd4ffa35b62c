"""Which attention backend a worker uses (`AttentionBackendKind`)."""

from __future__ import annotations

import os

import torch

from mnemosyne.config import AttentionBackendKind, ChunkKernelKind, ModelConfig
from mnemosyne.errors import ConfigError
from mnemosyne.layers.attention.backend import AttentionBackend
from mnemosyne.layers.attention.reference import TorchReferenceBackend
from mnemosyne.layers.linear import num_kv_heads_per_rank


def make_attention_backend(
    kind: AttentionBackendKind,
    cfg: ModelConfig,
    tp: int,
    device: torch.device,
    chunk_kernel: ChunkKernelKind = ChunkKernelKind.TRITON,
) -> AttentionBackend:
    """AUTO: kernels on CUDA, the reference elsewhere. Kernels on CPU need the Triton
    interpreter (TRITON_INTERPRET=1 before the kernels are imported). `chunk_kernel`: which
    kernel serves the kernel backend's tiled chunks (`ChunkKernelKind`)."""
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
    from mnemosyne.layers.attention.kernel_plan import ChunkKernelConfig

    num_heads_per_kv = (cfg.num_heads // tp) // num_kv_heads_per_rank(cfg.num_kv_heads, tp)
    chunk_config = ChunkKernelConfig(warp_specialized=chunk_kernel is ChunkKernelKind.WARP_SPECIALIZED)
    return KernelBackend(num_heads_per_kv, cfg.head_dim, cfg.dtype, device, chunk_config=chunk_config)
