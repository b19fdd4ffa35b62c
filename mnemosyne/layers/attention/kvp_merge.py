"""Exact attention across KV-cache-parallel (KVP) groups: one all-gather per layer.

A request whose KV spans several KVP groups appears in the sub-batch of each of
them with the same query tokens. Per layer, each group attends its queries to the
keys it holds and gets a partial (out_g, lse_g). Because the key sets of the
groups are disjoint and cover [0, position], merging the partials by online
softmax (`merge.py`) gives exactly the attention over all keys.

What crosses the KVP process group per layer (ranks with equal spp and tp rank):

    shared buffer  [N_s, num_local_heads, head_dim + w]   (w = 4 / itemsize: the fp32 LSE packed
                                                           into the output dtype)
    N_s = tokens of this step's chunks held by more than one group (StepPlan.num_shared_tokens),
          the same on every group; a group fills the rows of the requests it holds and leaves
          the others at out = 0, lse = -inf (weight 0 in the merge)

    all_gather -> [kvp, N_s, ...] -> every group merges the same partials in the same order
    -> identical merged rows on every group, written back over its own partial rows.

Unshared requests (all their keys on one group) never cross. With N_s == 0, or one
KVP group, nothing is sent.

An idle group (none of the step's chunks has keys on it, yet N_s > 0 because other groups
share chunks: with kvp >= 3 a request may span groups 0 and 1 while group 2 holds nothing)
runs no model compute but still joins each layer's all-gather, in the same layer order, with
an all-empty buffer: every row out = 0, lse = -inf. Its partial has weight exp(-inf - m) = 0
in every merge, so the merged rows are those of the busy groups alone: still exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mnemosyne.layers.attention.merge import merge_attn_stacked
from mnemosyne.parallel.comm import all_gather_stacked
from mnemosyne.parallel.groups import GroupHandle


@dataclass
class KVPMergeIndex:
    num_shared_tokens: int  # N_s, equal on every KVP group of the step
    local_rows: torch.Tensor  # [num_local_shared] int64, rows of this sub-batch that are shared
    shared_rows: torch.Tensor  # [num_local_shared] int64, their rows in the step-wide shared buffer


def merge_across_kvp_groups(
    out: torch.Tensor,  # [num_tokens, num_heads, head_dim], this group's partial
    lse: torch.Tensor,  # [num_tokens, num_heads] float32
    index: KVPMergeIndex | None,
    kvp_handle: GroupHandle,
) -> torch.Tensor:
    """Replace the shared rows of `out` by the merge over every KVP group; returns out."""
    if kvp_handle.size == 1 or index is None or index.num_shared_tokens == 0:
        return out
    n, (_, num_heads, head_dim) = index.num_shared_tokens, out.shape
    lse_buf = torch.full((n, num_heads), float("-inf"), dtype=torch.float32, device=out.device)
    lse_buf[index.shared_rows] = lse[index.local_rows].float()
    packed = _pack(lse_buf, head_dim, out.dtype)  # [N_s, H, D + w]
    packed[index.shared_rows, :, :head_dim] = out[index.local_rows]
    gathered = all_gather_stacked(packed, kvp_handle)  # [kvp, N_s, H, D + w]
    outs = gathered[..., :head_dim]  # [kvp, N_s, H, D]
    lses = gathered[..., head_dim:].contiguous().view(torch.float32).squeeze(-1)  # [kvp, N_s, H]
    merged, _ = merge_attn_stacked(outs, lses)  # [N_s, H, D]
    out[index.local_rows] = merged[index.shared_rows]
    return out


def join_kvp_merge_idle(
    num_shared_tokens: int,
    num_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    kvp_handle: GroupHandle,
) -> None:
    """An idle group's part in one layer's merge: the all-gather of `merge_across_kvp_groups`
    with every row empty (out = 0, lse = -inf), so the busy groups' merge is unchanged."""
    if kvp_handle.size == 1 or num_shared_tokens == 0:
        return
    lse_buf = torch.full((num_shared_tokens, num_heads), float("-inf"), dtype=torch.float32, device=device)
    all_gather_stacked(_pack(lse_buf, head_dim, dtype), kvp_handle)


def _pack(lse: torch.Tensor, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """[N_s, H] float32 LSE -> [N_s, H, D + w] buffer of `dtype`: out = 0, then the LSE's bytes
    as w = 4 / itemsize trailing elements."""
    n, num_heads = lse.shape
    width = 4 // dtype.itemsize
    packed = torch.zeros(n, num_heads, head_dim + width, dtype=dtype, device=lse.device)
    packed[:, :, head_dim:] = lse.view(dtype).view(n, num_heads, width)
    return packed
