"""The attention backend interface: paged KV write plus attention returning the LSE."""

from __future__ import annotations

from typing import Protocol

import torch

from mnemosyne.layers.attention.metadata import AttentionMetadata


class AttentionBackend(Protocol):
    def write_kv(
        self,
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        slot_mapping: torch.Tensor,  # [num_tokens] int64, -1 = skip
    ) -> None: ...

    def warm_up(
        self,
        k_cache: torch.Tensor,  # one layer's [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,
        sliding_window: int | None,
        max_num_decodes: int = 1,
        max_num_batched_tokens: int = 0,
        max_prefix_tokens: int = 0,
        exact_query_lens: tuple[int, ...] = (),
    ) -> None:
        """Compile / plan what serving would otherwise do on its first steps (cache read only),
        for steps of up to `max_num_decodes` decodes and `max_num_batched_tokens` tokens, after
        prefixes of up to `max_prefix_tokens` keys (0: the chunk paths' plans are not built);
        `exact_query_lens`: chunk lengths that serving will meet often (a prefill lane's), worth
        plans for their exact shapes where a backend has such (the kernel backend's cuDNN)."""
        ...

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (out [num_tokens, num_heads, head_dim] in query dtype,
        lse [num_tokens, num_heads] float32, natural log; -inf where a row sees no key)."""
        ...
