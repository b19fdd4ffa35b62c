"""Exact attention across KV-cache-parallel (KVP) groups: one all-gather per layer.

A request whose KV spans several KVP groups appears in the sub-batch of each of
them with the same query tokens. Per layer, each group attends its queries to the
keys it holds and gets a partial (out_g, lse_g). Because the key sets of the
groups are disjoint and cover [0, position], merging the partials by online
softmax (`merge.py`) gives exactly the attention over all keys.

What crosses the KVP process group per layer (ranks with equal spp and tp rank):

    shared buffer  [R, num_local_heads, head_dim + w]     (w = 4 / itemsize: the fp32 LSE packed
                                                           into the output dtype)
    N_s = tokens of this step's chunks held by more than one group (StepPlan.num_shared_tokens),
          the same on every group
    R   = merge_buffer_rows(N_s) = padded_shared_tokens(N_s) + 1, the same on every group:

          slot   0 .. N_s-1          N_s .. R-2          R-1
                 shared tokens       padding             trash
                 (plan order)        (every group: out = 0, lse = -inf)

    each row r of a group's sub-batch has slots[r]: its shared token's slot, or the trash
    slot when r is not shared (an unshared request, a padding row of a CUDA graph). Every
    row is scattered to its slot; only the trash slot receives several rows (any of them
    wins: it is never read back).

    all_gather -> [kvp, R, ...] -> every group merges the same partials in the same order
    -> identical merged rows on every group; a shared row (slot < R - 1) takes its slot's
    merged row, every other row keeps its own partial.

N_s is padded to a power of two up to MAX_GRAPH_SHARED_TOKENS, so a decode step with 1..4
shared tokens fits the fixed all-gather of a captured CUDA graph (`worker/cuda_graph.py`),
whichever path (graph, piecewise, eager, idle) each group takes: R depends on N_s alone.

Unshared requests (all their keys on one group) are never merged: their rows only land in
the trash slot. With N_s == 0, or one KVP group, nothing is sent.

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

MAX_GRAPH_SHARED_TOKENS = 4  # decode steps with up to this many shared tokens replay graphs


def padded_shared_tokens(num_shared_tokens: int) -> int:
    """N_s rounded up to a power of two while it is at most MAX_GRAPH_SHARED_TOKENS (0 stays 0)."""
    if num_shared_tokens <= 0 or num_shared_tokens > MAX_GRAPH_SHARED_TOKENS:
        return max(num_shared_tokens, 0)
    return 1 << (num_shared_tokens - 1).bit_length()


def merge_buffer_rows(num_shared_tokens: int) -> int:
    """R: the shared buffer's rows, padding and the trash row included (0: no merge)."""
    padded = padded_shared_tokens(num_shared_tokens)
    return padded + 1 if padded else 0


@dataclass
class KVPMergeIndex:
    num_shared_tokens: int  # N_s, equal on every KVP group of the step (padded inside a graph)
    slots: torch.Tensor  # [num_tokens] int64: a row's slot in the shared buffer, or the trash slot R - 1

    @property
    def num_rows(self) -> int:
        return merge_buffer_rows(self.num_shared_tokens)


def merge_across_kvp_groups(
    out: torch.Tensor,  # [num_tokens, num_heads, head_dim], this group's partial
    lse: torch.Tensor,  # [num_tokens, num_heads] float32
    index: KVPMergeIndex | None,
    kvp_handle: GroupHandle,
) -> torch.Tensor:
    """`out` with its shared rows replaced by the merge over every KVP group."""
    if kvp_handle.size == 1 or index is None or index.num_shared_tokens == 0:
        return out
    rows, (_, num_heads, head_dim) = index.num_rows, out.shape
    lse_buf = torch.full((rows, num_heads), float("-inf"), dtype=torch.float32, device=out.device)
    lse_buf[index.slots] = lse.float()
    packed = _pack(lse_buf, head_dim, out.dtype)  # [R, H, D + w]
    packed[index.slots, :, :head_dim] = out
    gathered = all_gather_stacked(packed, kvp_handle)  # [kvp, R, H, D + w]
    outs = gathered[..., :head_dim]  # [kvp, R, H, D]
    lses = gathered[..., head_dim:].contiguous().view(torch.float32).squeeze(-1)  # [kvp, R, H]
    merged, _ = merge_attn_stacked(outs, lses)  # [R, H, D]
    is_shared = (index.slots < rows - 1)[:, None, None]  # [num_tokens, 1, 1]
    return torch.where(is_shared, merged[index.slots], out)  # [num_tokens, H, D]


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
    rows = merge_buffer_rows(num_shared_tokens)
    lse_buf = torch.full((rows, num_heads), float("-inf"), dtype=torch.float32, device=device)
    all_gather_stacked(_pack(lse_buf, head_dim, dtype), kvp_handle)


def _pack(lse: torch.Tensor, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """[R, H] float32 LSE -> [R, H, D + w] buffer of `dtype`: out = 0, then the LSE's bytes
    as w = 4 / itemsize trailing elements."""
    n, num_heads = lse.shape
    width = 4 // dtype.itemsize
    packed = torch.zeros(n, num_heads, head_dim + width, dtype=dtype, device=lse.device)
    packed[:, :, head_dim:] = lse.view(dtype).view(n, num_heads, width)
    return packed
