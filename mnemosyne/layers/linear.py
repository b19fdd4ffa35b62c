"""Tensor-parallel linear layers with shard-aware weight loading.

Column-parallel layers split the output dim over the TP ranks and concatenate
several logical projections (q|k|v, or gate|up) so one matmul serves them all.
Rank t of a TP group of size tp holds, for every logical shard i, the checkpoint
rows `[src_start_i, src_start_i + size_i)` (an even 1/tp slice, or the KV heads
it needs), stored back to back::

    checkpoint tensor of shard i:  [ rank 0 | rank 1 | ... | rank tp-1 ]   (s_i rows)
    local weight rows of rank t:   [ shard 0 slice ) [ shard 1 slice ) [ ... )
                                     size s_0 / tp     size s_1 / tp

Row-parallel layers (o_proj, down_proj) split the input dim the same way, so
they consume the local slice a column-parallel layer produced; their partial
products are summed over TP (`all_reduce`), and the bias is added once after.

`load_shard` / `load` take the FULL checkpoint tensor and slice it for this
rank: the single place that knows row and column offsets. With a size-1 group
every layer is a plain `F.linear` with the same numerics as an unsharded one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mnemosyne.parallel.comm import all_reduce
from mnemosyne.parallel.groups import GroupHandle

ParamName = Literal["weight", "bias"]


@dataclass(frozen=True)
class RowSlice:
    """The rows of one logical shard's checkpoint tensor that this rank holds."""

    full_size: int  # rows of the checkpoint tensor
    src_start: int  # first checkpoint row held here
    size: int  # rows held here


def even_slice(full_size: int, tp_group: GroupHandle) -> RowSlice:
    """Rank t's slice `[t * s / tp, (t + 1) * s / tp)` of `full_size` rows."""
    tp, tp_rank = tp_group.size, tp_group.rank_in_group
    if full_size % tp:
        raise ValueError(f"size {full_size} is not divisible by tensor parallel size {tp}")
    size = full_size // tp
    return RowSlice(full_size, tp_rank * size, size)


def num_kv_heads_per_rank(num_kv_heads: int, tp: int) -> int:
    """KV heads a TP rank holds: an even split, or one replicated head when tp > num_kv_heads."""
    if num_kv_heads >= tp:
        if num_kv_heads % tp:
            raise ValueError(f"num_kv_heads {num_kv_heads} is not divisible by tensor parallel size {tp}")
        return num_kv_heads // tp
    if tp % num_kv_heads:
        raise ValueError(
            f"tensor parallel size {tp} is not a multiple of num_kv_heads {num_kv_heads} "
            "(needed to replicate KV heads)"
        )
    return 1


def kv_head_start(num_kv_heads: int, tp: int, tp_rank: int) -> int:
    """First KV head held by `tp_rank`. When tp > num_kv_heads, rank t holds head
    t // (tp // num_kv_heads) (each head replicated on tp // num_kv_heads ranks)."""
    per_rank = num_kv_heads_per_rank(num_kv_heads, tp)
    if num_kv_heads >= tp:
        return tp_rank * per_rank
    return tp_rank // (tp // num_kv_heads)


def _param(shape: tuple[int, ...], dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)


class Linear(nn.Module):
    """A plain (replicated) linear layer; the checkpoint tensor is copied whole."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = _param((out_features, in_features), dtype)
        self.bias = _param((out_features,), dtype) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def _target(self, name: ParamName) -> nn.Parameter:
        target = self.weight if name == "weight" else self.bias
        if target is None:
            raise ValueError(f"checkpoint has a {name} for a layer built without one")
        return target

    def load(self, name: ParamName, tensor: torch.Tensor) -> None:
        target = self._target(name)
        if tensor.shape != target.shape:
            raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != {tuple(target.shape)}")
        target.data.copy_(tensor)


class ShardedColumnLinear(Linear):
    """Output dim split over TP: logical shard i contributes `slices[i].size` rows here.
    The output is this rank's slice, [num_tokens, sum(local_sizes)]; nothing is gathered."""

    def __init__(self, in_features: int, slices: Sequence[RowSlice], bias: bool, dtype: torch.dtype) -> None:
        super().__init__(in_features, sum(s.size for s in slices), bias, dtype)
        self.slices = list(slices)
        self.local_sizes = [s.size for s in slices]
        self.offsets = [sum(self.local_sizes[:i]) for i in range(len(slices))]

    def load_shard(self, shard: int, name: ParamName, tensor: torch.Tensor) -> None:
        """Copy this rank's rows of logical shard `shard`'s full checkpoint `weight` or `bias`."""
        target = self._target(name)
        sl = self.slices[shard]
        if tensor.shape[0] != sl.full_size or tensor.shape[1:] != target.shape[1:]:
            want = (sl.full_size, *target.shape[1:])
            raise ValueError(
                f"shard {shard} {name} expects shape {want}, checkpoint has {tuple(tensor.shape)}"
            )
        lo = self.offsets[shard]
        target.data[lo : lo + sl.size].copy_(tensor.narrow(0, sl.src_start, sl.size))


class ColumnParallelLinear(ShardedColumnLinear):
    """One projection, output rows split evenly over TP."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        dtype: torch.dtype,
        tp_group: GroupHandle | None = None,
    ) -> None:
        tp_group = tp_group or GroupHandle.trivial()
        super().__init__(in_features, [even_slice(out_features, tp_group)], bias, dtype)

    def load(self, name: ParamName, tensor: torch.Tensor) -> None:
        self.load_shard(0, name, tensor)


class MergedColumnParallelLinear(ShardedColumnLinear):
    """Several projections (gate|up) of sizes `out_sizes`, each split evenly over TP."""

    def __init__(
        self,
        in_features: int,
        out_sizes: Sequence[int],
        bias: bool,
        dtype: torch.dtype,
        tp_group: GroupHandle | None = None,
    ) -> None:
        tp_group = tp_group or GroupHandle.trivial()
        super().__init__(in_features, [even_slice(s, tp_group) for s in out_sizes], bias, dtype)


class QKVParallelLinear(ShardedColumnLinear):
    """q|k|v, split by heads: q heads evenly; KV heads evenly when num_kv_heads >= tp,
    otherwise one KV head per rank, replicated (rank t holds head t // (tp // num_kv_heads)).
    Shards: 0 = q, 1 = k, 2 = v (weights and biases alike)."""

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool,
        dtype: torch.dtype,
        tp_group: GroupHandle | None = None,
    ) -> None:
        tp_group = tp_group or GroupHandle.trivial()
        tp, tp_rank = tp_group.size, tp_group.rank_in_group
        if num_heads % tp:
            raise ValueError(f"num_heads {num_heads} is not divisible by tensor parallel size {tp}")
        num_local_heads = num_heads // tp
        num_local_kv_heads = num_kv_heads_per_rank(num_kv_heads, tp)
        q_size, kv_size = num_local_heads * head_dim, num_local_kv_heads * head_dim
        q_slice = RowSlice(num_heads * head_dim, tp_rank * q_size, q_size)
        kv_start = kv_head_start(num_kv_heads, tp, tp_rank) * head_dim
        kv_slice = RowSlice(num_kv_heads * head_dim, kv_start, kv_size)
        super().__init__(hidden_size, [q_slice, kv_slice, kv_slice], bias, dtype)
        self.head_dim = head_dim
        self.num_local_heads = num_local_heads
        self.num_local_kv_heads = num_local_kv_heads


class RowParallelLinear(Linear):
    """Input dim split evenly over TP: y = all_reduce(x_local @ W_local^T) + b.
    `x` is this rank's slice [num_tokens, in_features / tp]; the output is full and
    identical on every TP rank. With tp == 1 it is exactly `F.linear(x, W, b)`."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        dtype: torch.dtype,
        tp_group: GroupHandle | None = None,
    ) -> None:
        tp_group = tp_group or GroupHandle.trivial()
        in_slice = even_slice(in_features, tp_group)
        super().__init__(in_slice.size, out_features, bias, dtype)
        self.tp_group = tp_group
        self.in_slice = in_slice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_group.size == 1:
            return F.linear(x, self.weight, self.bias)
        out = all_reduce(F.linear(x, self.weight), self.tp_group)  # [num_tokens, out_features]
        return out if self.bias is None else out + self.bias

    def load(self, name: ParamName, tensor: torch.Tensor) -> None:
        """Copy this rank's columns of the full checkpoint weight; the bias is copied whole."""
        if name == "bias":
            super().load(name, tensor)
            return
        sl = self.in_slice
        if tensor.shape != (self.out_features, sl.full_size):
            want = (self.out_features, sl.full_size)
            raise ValueError(f"weight expects shape {want}, checkpoint has {tuple(tensor.shape)}")
        self.weight.data.copy_(tensor.narrow(1, sl.src_start, sl.size))
