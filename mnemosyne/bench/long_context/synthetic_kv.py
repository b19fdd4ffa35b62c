"""Benchmark-only: decode after a long prefix whose K/V are synthetic (no 1M+ prefill).

A 1M-token prefill of even the 1B shape takes minutes, and decode cost does not depend
on the cached values. So the long request goes through the real engine (add_request,
Scheduler, KVCacheManager, PlanBuilder, `LLMEngine.step`, the worker's CUDA graphs) and
only its prefill compute is replaced::

    scheduler      chunk [s, e) of a synthetic request; the KV manager allocates its blocks
    SyntheticPrefillExecutor.submit
                   that chunk -> the 1-token chunk [e-1, e) with the same pieces (the worker
                   still mirrors every new block id); one query at position e-1 over e keys,
                   one slot written; other requests' chunks (short prompts) run unchanged
    prefill done   fill_synthetic_kv: N(0, 1) values into every block of the request
                   (every layer, K and V), overwriting whatever the 1-token chunks wrote
    decode steps   unchanged: the synthetic request decodes like any other

The sampled tokens are meaningless (the keys are noise); the timings are those of a
real decode over that many keys. Results must say that the KV is synthetic.
Single process only (the fill writes the worker's caches in this process).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import torch

from mnemosyne.executor.uniproc import UniProcExecutor
from mnemosyne.models.llama import KVCache
from mnemosyne.wire.plan import ChunkPlan, StepPlan, StepResult

_FILL_BLOCKS = 8192  # blocks per random draw (8192 x 16 tokens of the 1B shape: 67 MB)


def skip_prefill_compute(chunk: ChunkPlan) -> ChunkPlan:
    """The chunk reduced to its last token (same pieces, so the same blocks are mirrored)."""
    if chunk.num_tokens <= 1:
        return chunk
    end = chunk.end
    return replace(
        chunk,
        start=end - 1,
        num_tokens=1,
        token_ids=chunk.token_ids[-1:],
        prompt_logprob_start=end - 1,
        prompt_logprob_targets=(),
    )


class SyntheticPrefillExecutor:
    """Wraps the in-process executor: prefill chunks of `synthetic_ids` skip their compute."""

    def __init__(self, inner: UniProcExecutor) -> None:
        if not isinstance(inner, UniProcExecutor):
            raise TypeError("synthetic KV needs the in-process executor (one device, no driver address)")
        self.inner = inner
        self.synthetic_ids: set[str] = set()
        self.num_skipped_tokens = 0

    @property
    def worker(self):  # -> Worker
        return self.inner.worker

    def submit(self, plan: StepPlan) -> None:
        chunks = []
        for c in plan.chunks:
            if c.request_id in self.synthetic_ids and c.num_tokens > 1:
                self.num_skipped_tokens += c.num_tokens - 1
                c = skip_prefill_compute(c)
            chunks.append(c)
        self.inner.submit(replace(plan, chunks=tuple(chunks)))

    def get_result(self) -> StepResult:
        return self.inner.get_result()

    @property
    def num_rejected_messages(self) -> int:
        return self.inner.num_rejected_messages

    def check_health(self) -> None:
        self.inner.check_health()

    def shutdown(self) -> None:
        self.inner.shutdown()


@torch.inference_mode()
def fill_synthetic_kv(kv_caches: list[KVCache], block_ids: Iterable[int], seed: int = 0) -> int:
    """Write N(0, 1) K and V into the given blocks of every layer; returns the bytes written."""
    if not kv_caches:
        return 0
    device = kv_caches[0][0].device
    ids = torch.tensor(list(block_ids), dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    written = 0
    for layer in kv_caches:
        for cache in layer:  # [num_blocks, block_size, num_kv_heads, head_dim]
            for lo in range(0, len(ids), _FILL_BLOCKS):
                idx = ids[lo : lo + _FILL_BLOCKS]
                values = torch.randn(
                    (len(idx), *cache.shape[1:]), generator=gen, device=device, dtype=cache.dtype
                )
                cache.index_copy_(0, idx, values)
                written += values.numel() * values.element_size()
    return written
