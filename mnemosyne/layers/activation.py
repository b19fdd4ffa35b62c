"""SiLU-and-mul of the MLP: `silu(gate) * up` over the merged gate/up projection's output."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mnemosyne.kernels import load_fused_ops


def silu_and_mul(
    x: torch.Tensor,  # [num_tokens, 2 * inter]: [gate | up]
) -> torch.Tensor:  # [num_tokens, inter]
    """One fused Triton kernel on CUDA (same roundings); the torch ops on CPU."""
    if x.is_cuda:
        return load_fused_ops().silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
