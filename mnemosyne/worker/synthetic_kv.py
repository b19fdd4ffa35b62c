"""BENCHMARK-ONLY: N(0, 1) K/V written straight into a request's KV blocks on one rank.

The synthetic-KV decode benchmark (bench/long_context/synthetic_kv.py) skips a long
prompt's prefill compute and fills the blocks the KV manager allocated with noise
instead: decode cost does not depend on the cached values. Each rank fills the blocks
its own block-table mirror holds for the request, so every layout works the same way::

    in-process executor   UniProcExecutor.fill_synthetic_kv -> Worker.fill_synthetic_kv
    worker processes      MultiProcExecutor.fill_synthetic_kv -> FillSyntheticKV to every rank
                          -> Worker.fill_synthetic_kv -> SyntheticKVFilled back (parallel/messages.py)

    rank (group g, stage s, tp rank t):  every block of mirror[request] (group g's pieces),
                                         every layer of stage s, its KV heads: K and V

The values are a function of (seed, rank) and of the mirror's block order only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mnemosyne.models.llama import KVCache

_FILL_ELEMENTS = 1 << 25  # values per random draw (64 MiB in bf16)


@torch.inference_mode()
def fill_blocks(kv_caches: list[KVCache], block_ids: Sequence[int], seed: int) -> tuple[int, float]:
    """Write N(0, 1) K and V (in the cache dtype) into `block_ids` of every layer.

    Returns (bytes written, mean of x^2 over the values read back from those blocks):
    ~1 when the writes landed, 0.0 when there was nothing to write. Synchronizes with
    the device (the read-back), so the writes are done when it returns."""
    if not kv_caches or not block_ids:
        return 0, 0.0
    device = kv_caches[0][0].device
    ids = torch.tensor(list(block_ids), dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    square_sum = torch.zeros((), dtype=torch.float64, device=device)
    num_values = 0
    num_bytes = 0
    for layer in kv_caches:
        for cache in layer:  # [num_blocks, block_size, num_kv_heads, head_dim]
            per_draw = max(1, _FILL_ELEMENTS // cache[0].numel())
            for lo in range(0, len(ids), per_draw):
                idx = ids[lo : lo + per_draw]
                values = torch.randn(
                    (len(idx), *cache.shape[1:]), generator=gen, device=device, dtype=cache.dtype
                )
                cache.index_copy_(0, idx, values)
                square_sum += cache.index_select(0, idx).float().square().sum(dtype=torch.float64)
                num_values += values.numel()
                num_bytes += values.numel() * values.element_size()
    return num_bytes, square_sum.item() / num_values
