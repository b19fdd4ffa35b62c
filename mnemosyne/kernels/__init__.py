"""Triton kernels: attention over the paged KV cache, fused elementwise ops."""

from __future__ import annotations

import functools
from types import ModuleType

# Prefix keys per cuDNN call of the long-chunk path (`cudnn_prefill.py`): bounds its
# gathered K/V temporaries, which the engine reserves memory for (`engine/args.py`).
DENSE_SEGMENT_TOKENS = 1 << 17


@functools.cache
def load_fused_ops() -> ModuleType:
    """`mnemosyne.kernels.fused_ops`, imported on first use: it needs Triton, which CPU-only
    installs may lack, and only CUDA tensors take it."""
    from mnemosyne.kernels import fused_ops

    return fused_ops
