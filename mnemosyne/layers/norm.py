"""RMSNorm, computed in float32 like the Hugging Face reference, with an optional fused residual add.

CUDA tensors take the fused Triton kernels (`mnemosyne/kernels/fused_ops.py`, same
roundings); CPU tensors the torch code below, bit-identical to the HF reference.
"""

from __future__ import annotations

import torch
from torch import nn

from mnemosyne.kernels import load_fused_ops


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype))

    def forward(
        self,
        x: torch.Tensor,  # [..., hidden_size]
        residual: torch.Tensor | None = None,  # [..., hidden_size]
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x); with `residual`: r = x + residual, returns (norm(r), r)."""
        if x.is_cuda:
            ops = load_fused_ops()
            if residual is None:
                return ops.rms_norm(x, self.weight, self.eps)
            return ops.add_rms_norm(x, residual, self.weight, self.eps)
        if residual is None:
            return self._torch_norm(x)
        r = x + residual
        return self._torch_norm(r), r

    def _torch_norm(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., hidden_size]
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)
