"""Triton kernels: attention over the paged KV cache, fused elementwise ops."""

from __future__ import annotations

import functools
from types import ModuleType

# Prefix keys per cuDNN call of the long-chunk path (`cudnn_prefill.py`): bounds its
# gathered K/V temporaries, which the engine reserves memory for (`engine/args.py`).
DENSE_SEGMENT_TOKENS = 1 << 17
# The key granule of its exact graphs (`cudnn_prefill.py`): an exact prefix segment holds a
# multiple of it, so a chunk length has DENSE_SEGMENT_TOKENS / EXACT_SEGMENT_KEYS of them
# (8), and the keys past the last multiple take a ragged graph.
EXACT_SEGMENT_KEYS = 1 << 14


@functools.cache
def load_fused_ops() -> ModuleType:
    """`mnemosyne.kernels.fused_ops`, imported on first use: it needs Triton, which CPU-only
    installs may lack, and only CUDA tensors take it."""
    from mnemosyne.kernels import fused_ops

    return fused_ops
