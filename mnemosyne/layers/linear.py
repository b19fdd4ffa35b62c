"""Linear layers with shard-aware weight loading.

`MergedLinear` concatenates several logical projections along the output dim
(q|k|v, or gate|up) so one matmul serves them all:

    weight rows:  [ 0 ........ s0 ) [ s0 ...... s0+s1 ) [ ... )
                    shard 0           shard 1             shard 2

Tensor parallelism will split each shard across ranks; the loaders below are the
single place that knows the row offsets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedLinear(Linear):
    def __init__(self, in_features: int, out_sizes: list[int], bias: bool, dtype: torch.dtype) -> None:
        super().__init__(in_features, sum(out_sizes), bias, dtype)
        self.out_sizes = list(out_sizes)
        self.offsets = [sum(out_sizes[:i]) for i in range(len(out_sizes))]

    def load_shard(self, shard: int, name: str, tensor: torch.Tensor) -> None:
        """Copy one logical projection's `weight` or `bias` into its rows."""
        lo, size = self.offsets[shard], self.out_sizes[shard]
        target = self.weight if name == "weight" else self.bias
        if target is None:
            raise ValueError(f"checkpoint has a {name} for a layer built without one")
        if tensor.shape[0] != size:
            raise ValueError(f"shard {shard} expects {size} rows, checkpoint has {tuple(tensor.shape)}")
        target.data[lo : lo + size].copy_(tensor)
