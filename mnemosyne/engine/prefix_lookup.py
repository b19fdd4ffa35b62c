"""The scheduler's side of the prefix cache: what an arrival takes over, whether its whole
prompt fits net of that hit, and offering computed blocks to the cache.

    admission (waiting request R, its prompt of num_tokens tokens)
        hit = find_cached_prefix(kv, R)          hash R's full blocks in growing windows
        can_hold_whole_prompt(kv, R, hit)        new blocks needed <= free blocks not in the hit
        R starts at num_computed == num_dispatched == hit.num_tokens
    after each applied chunk
        cache_computed_blocks(kv, R)             full blocks below num_computed -> the cache

The cache itself (blocks, hashes, placement over KVP groups) is `kv_cache/manager.py`'s.
"""

from __future__ import annotations

from mnemosyne.kv_cache.manager import KVCacheManager
from mnemosyne.kv_cache.prefix_hit import PrefixHit
from mnemosyne.request import Request

PREFIX_LOOKUP_BLOCKS = 16  # the first window of blocks an arrival hashes for its cache lookup


def can_hold_whole_prompt(kv: KVCacheManager, req: Request, hit: PrefixHit | None) -> bool:
    """Do the free blocks hold the rest of `req`'s known tokens after its hit (if any)?"""
    if hit is None:
        return kv.blocks_needed(req.num_tokens) <= kv.num_free_blocks_total
    # Hit blocks are not allocated, and those nobody references stop counting as free.
    needed = kv.blocks_needed(req.num_tokens) - hit.num_blocks
    return needed <= kv.num_free_blocks_total - hit.num_free_blocks


def find_cached_prefix(kv: KVCacheManager, req: Request) -> PrefixHit | None:
    """The request's cached prefix; None when caching is off or it wants prompt logprobs.
    Its blocks are hashed only as far as the lookup needs: in windows growing 4x from
    16 blocks, until one holds a block no group caches (a 500K-token prompt costs one
    window, not 16 ms of hashing, on arrival; the rest is hashed as chunks complete)."""
    if not kv.enable_prefix_caching or req.sampling_params.prompt_logprobs is not None:
        return None
    window = max(len(req.block_hashes), PREFIX_LOOKUP_BLOCKS)
    while True:
        kv.hasher.extend(req.block_hashes, req.prompt_token_ids, req.output_token_ids, window)
        hit = kv.find_cached_prefix(req.block_hashes, req.num_tokens)
        if hit.num_blocks < len(req.block_hashes) or len(req.block_hashes) < window:
            return hit  # a miss inside the window, or every full block hashed
        window *= 4


def cache_computed_blocks(kv: KVCacheManager, req: Request) -> None:
    """Offer the request's computed full blocks to the prefix cache."""
    num_full = req.num_computed_tokens // kv.block_size
    if kv.enable_prefix_caching and num_full > len(req.block_hashes):
        kv.hasher.extend(req.block_hashes, req.prompt_token_ids, req.output_token_ids, num_full)
    kv.cache_blocks(req.request_id, req.block_hashes, req.num_computed_tokens)
