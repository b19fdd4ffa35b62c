"""What one step holds, reduced to the sums a latency model needs.

A step is one micro-batch. With KVP, each group runs its own sub-batch
(`worker/sub_batch.py`): its short requests, plus the query tokens of every chunk
or decode whose keys it partly holds. Per group the model sees::

    GroupLoad
      num_tokens            query tokens through the dense layers (decodes + chunk tokens)
      decodes               num_decodes, decode_kv_tokens = sum of keys read, max_decode_kv_tokens
      chunks                num_chunks, chunk_prefix_tokens = sum P, chunk_prefix_pairs = sum c*P,
                            chunk_causal_pairs = sum c(c+1)/2 (only where the group owns the chunk),
                            chunk_shapes = (c, keys) of each chunk, keys = P (+ c where owned):
                            what the attention kernel sees (`latency/kernel_cost.py`)
      num_sampled           rows through the LM head

    chunk of c query tokens after P keys held by this group:
      keys  [ .... P prefix keys .... | c own keys (causal, owner group only) ]

`StepComposition` = one `GroupLoad` per KVP group + the query tokens whose attention
partials are merged across groups (`num_shared_tokens`, the per-layer all-gather).
Every count is in tokens; nothing here is a time.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GroupLoad:
    num_tokens: int = 0
    num_decodes: int = 0
    decode_kv_tokens: int = 0
    max_decode_kv_tokens: int = 0
    num_chunks: int = 0
    chunk_prefix_tokens: int = 0
    chunk_prefix_pairs: int = 0
    chunk_causal_pairs: int = 0
    num_sampled: int = 0
    chunk_shapes: tuple[tuple[int, int], ...] = ()  # (query tokens, keys incl. own) per chunk

    def plus_decode(self, kv_tokens: int, owns: bool = True) -> GroupLoad:
        """A decode reading `kv_tokens` keys here (its own key included where it is owned)."""
        return GroupLoad(  # built whole, not dataclasses.replace: called per chunk per step (simulator)
            num_tokens=self.num_tokens + 1,
            num_decodes=self.num_decodes + 1,
            decode_kv_tokens=self.decode_kv_tokens + kv_tokens,
            max_decode_kv_tokens=max(self.max_decode_kv_tokens, kv_tokens),
            num_chunks=self.num_chunks,
            chunk_prefix_tokens=self.chunk_prefix_tokens,
            chunk_prefix_pairs=self.chunk_prefix_pairs,
            chunk_causal_pairs=self.chunk_causal_pairs,
            num_sampled=self.num_sampled + int(owns),
            chunk_shapes=self.chunk_shapes,
        )

    def plus_chunk(
        self, num_tokens: int, prefix_tokens: int, owns: bool = True, sample: bool = False
    ) -> GroupLoad:
        """A prefill chunk of `num_tokens` queries over `prefix_tokens` keys held here; `owns`:
        its own keys are here too (causal part); `sample`: its last row goes through the LM head."""
        c = num_tokens
        return GroupLoad(
            num_tokens=self.num_tokens + c,
            num_decodes=self.num_decodes,
            decode_kv_tokens=self.decode_kv_tokens,
            max_decode_kv_tokens=self.max_decode_kv_tokens,
            num_chunks=self.num_chunks + 1,
            chunk_prefix_tokens=self.chunk_prefix_tokens + prefix_tokens,
            chunk_prefix_pairs=self.chunk_prefix_pairs + c * prefix_tokens,
            chunk_causal_pairs=self.chunk_causal_pairs + (c * (c + 1) // 2 if owns else 0),
            num_sampled=self.num_sampled + int(owns and sample),
            chunk_shapes=(*self.chunk_shapes, (c, prefix_tokens + (c if owns else 0))),
        )

    @property
    def is_empty(self) -> bool:
        return self.num_tokens == 0


@dataclass(frozen=True)
class StepComposition:
    groups: tuple[GroupLoad, ...]  # one per KVP group, in group order
    num_shared_tokens: int = 0  # query tokens merged across KVP groups (per layer all-gather)

    @classmethod
    def single(cls, load: GroupLoad) -> StepComposition:
        return cls((load,))

    def with_group(
        self, group: int, load: GroupLoad, num_shared_tokens: int | None = None
    ) -> StepComposition:
        groups = list(self.groups)
        groups[group] = load
        shared = self.num_shared_tokens if num_shared_tokens is None else num_shared_tokens
        return StepComposition(tuple(groups), shared)
