"""The attention layer used by models: write the new K/V, attend over the paged cache,
merge partials across KVP groups (`kvp_merge.py`)."""

from __future__ import annotations

import torch
from torch import nn

from mnemosyne.layers.attention.backend import AttentionBackend
from mnemosyne.layers.attention.kvp_merge import join_kvp_merge_idle, merge_across_kvp_groups
from mnemosyne.layers.attention.metadata import AttentionMetadata
from mnemosyne.parallel.groups import GroupHandle


class PagedAttention(nn.Module):
    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        backend: AttentionBackend,
        sliding_window: int | None = None,
        kvp_handle: GroupHandle | None = None,
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.sliding_window = sliding_window
        self.backend = backend
        self.kvp_handle = kvp_handle or GroupHandle.trivial()

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: tuple[torch.Tensor, torch.Tensor],  # 2 x [num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        k_cache, v_cache = kv_cache
        self.backend.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out, lse = self.backend.forward(q, k_cache, v_cache, meta, self.scale, self.sliding_window)
        return merge_across_kvp_groups(out, lse, meta.kvp_merge, self.kvp_handle)  # [num_tokens, H, D]

    def join_idle(self, num_shared_tokens: int, dtype: torch.dtype, device: torch.device) -> None:
        """This group has no tokens in the step: no write, no attention, only its (empty) part
        in the KVP all-gather that the busy groups' forward runs at this layer."""
        join_kvp_merge_idle(num_shared_tokens, self.num_heads, self.head_dim, dtype, device, self.kvp_handle)
