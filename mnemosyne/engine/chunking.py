"""How many tokens of a request to run in one step.

The scheduler asks the policy once per request per step and then clips the answer
to the KV group boundary (`KVCacheManager.max_chunk_tokens`). A policy must return
a value in [0, min(num_pending, budget_left)], and >= 1 whenever both are >= 1, so
every scheduled request makes progress.

`FixedChunkPolicy` is Sarathi-Serve's fixed chunk. An adaptive policy, driven by a
latency model (pick the largest chunk whose predicted step time stays within a
target), will implement the same `ChunkPolicy` protocol later.
"""

from __future__ import annotations

from typing import Protocol

from mnemosyne.request import Request


class ChunkPolicy(Protocol):
    def chunk_size(self, request: Request, num_pending: int, budget_left: int) -> int:
        """Tokens of `request` to run now, out of `num_pending`, within `budget_left`."""
        ...


class FixedChunkPolicy:
    """min(chunk_size, num_pending, budget_left); chunk_size None = no cap of its own."""

    def __init__(self, chunk_size: int | None = None) -> None:
        if chunk_size is not None and chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive or None, got {chunk_size}")
        self.max_chunk_tokens = chunk_size

    def chunk_size(self, request: Request, num_pending: int, budget_left: int) -> int:
        n = min(num_pending, budget_left)
        if self.max_chunk_tokens is not None:
            n = min(n, self.max_chunk_tokens)
        return max(n, 0)
