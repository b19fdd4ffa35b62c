"""Collectives over a `GroupHandle`, and stage-to-stage point-to-point transfers.

Every function is a no-op (or an identity) on a size-1 group, so single-device
code calls them unconditionally. They work on NCCL (CUDA tensors) and gloo (CPU).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mnemosyne.parallel.groups import GroupHandle


def all_reduce(x: torch.Tensor, h: GroupHandle) -> torch.Tensor:
    """Sum `x` over the group, in place; returns `x`. Empty tensors (the same on every
    member: TP ranks share their sub-batch) are skipped."""
    if h.process_group is not None and x.numel() > 0:
        dist.all_reduce(x, group=h.process_group)
    return x


def all_gather(x: torch.Tensor, h: GroupHandle, dim: int = 0) -> torch.Tensor:
    """Concatenate every member's `x` (same shape everywhere) along `dim`, in rank order."""
    if h.process_group is None:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(h.size)]
    dist.all_gather(parts, x, group=h.process_group)
    return torch.cat(parts, dim=dim)


def all_gather_stacked(x: torch.Tensor, h: GroupHandle) -> torch.Tensor:
    """Every member's `x`, stacked along a new leading dim: [group_size, *x.shape]."""
    if h.process_group is None:
        return x.unsqueeze(0)
    x = x.contiguous()
    out = torch.empty((h.size, *x.shape), dtype=x.dtype, device=x.device)
    dist.all_gather(list(out.unbind(0)), x, group=h.process_group)
    return out


def send_to_stage(x: torch.Tensor, dst: int, process_group: dist.ProcessGroup | None = None) -> dist.Work | None:
    """Start sending `x` to world rank `dst` (over `process_group` if given); keep `x` alive until the
    returned work completes."""
    if x.numel() == 0:
        return None
    return dist.isend(x.contiguous(), dst=dst, group=process_group)


def recv_from_stage(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    src: int,
    process_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Receive a tensor of a known shape from world rank `src` (over `process_group` if given)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if out.numel() > 0:
        dist.recv(out, src=src, group=process_group)
    return out
