"""How many tokens of a request to run in one step.

Per step the scheduler calls `begin_step(now, num_decoding)`, then asks the policy once per
request (in its order: decodes, then prefills) and clips the answer to the KV group
boundary (`KVCacheManager.num_tokens_to_group_end`); every chunk it emits is reported with
`on_scheduled`. A policy returns a value in [0, min(num_pending, budget_left)]; 0
means "not this step" (the request keeps its place).

`FixedChunkPolicy` is Sarathi-Serve's fixed chunk (never 0 while budget is left).
`AdaptiveChunkPolicy` (`adaptive_chunking.py`) sizes chunks by a latency model.
"""

from __future__ import annotations

from typing import Protocol

from mnemosyne.request import Request


class ChunkPolicy(Protocol):
    def begin_step(self, now: float, num_decoding: int) -> None:
        """A new step is being scheduled at time `now` (seconds, the scheduler's clock), while
        `num_decoding` running requests are past their prefill (in this step or, with a
        pipeline, still in flight)."""
        ...

    def on_scheduled(self, request: Request, start: int, num_tokens: int, sample: bool) -> None:
        """The scheduler emitted tokens [start, start + num_tokens) of `request` this step."""
        ...

    def chunk_size(self, request: Request, num_pending: int, budget_left: int) -> int:
        """Tokens of `request` to run now, out of `num_pending`, within `budget_left`."""
        ...


class FixedChunkPolicy:
    """min(chunk_size, num_pending, budget_left); chunk_size None = no cap of its own."""

    def __init__(self, chunk_size: int | None = None) -> None:
        if chunk_size is not None and chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive or None, got {chunk_size}")
        self.max_chunk_tokens = chunk_size

    def begin_step(self, now: float, num_decoding: int) -> None:
        pass

    def on_scheduled(self, request: Request, start: int, num_tokens: int, sample: bool) -> None:
        pass

    def chunk_size(self, request: Request, num_pending: int, budget_left: int) -> int:
        n = min(num_pending, budget_left)
        if self.max_chunk_tokens is not None:
            n = min(n, self.max_chunk_tokens)
        return max(n, 0)
