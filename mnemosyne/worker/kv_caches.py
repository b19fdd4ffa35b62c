"""This rank's KV cache tensors: one (K, V) pair per local layer, each
[num_blocks, block_size, num_local_kv_heads, head_dim], block ids as the KV manager's pool
hands them out (worker/block_table.py mirrors the tables that index them)."""

from __future__ import annotations

import torch

from mnemosyne.models.llama import KVCache, LlamaForCausalLM


def allocate_kv_caches(model: LlamaForCausalLM, num_blocks: int, block_size: int) -> list[KVCache]:
    """One (K, V) pair per local layer: 2 x [num_blocks, block_size, num_local_kv_heads, head_dim]."""
    cfg = model.config
    shape = (num_blocks, block_size, model.num_local_kv_heads, cfg.head_dim)
    device = next(model.parameters()).device
    return [
        (
            torch.zeros(shape, dtype=cfg.dtype, device=device),
            torch.zeros(shape, dtype=cfg.dtype, device=device),
        )
        for _ in range(model.num_local_layers)
    ]
