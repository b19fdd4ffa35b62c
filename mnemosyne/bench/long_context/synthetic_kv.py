"""Benchmark-only: decode after a long prefix whose K/V are synthetic (no 1M+ prefill).

A 1M-token prefill of even the 1B shape takes minutes, and decode cost does not depend
on the cached values. So the long request goes through the real engine (add_request,
Scheduler, KVCacheManager, PlanBuilder, `LLMEngine.step`, the workers' CUDA graphs) and
only its prefill compute is replaced::

    scheduler      chunk [s, e) of a synthetic request; the KV manager allocates its blocks
    SyntheticPrefillExecutor.submit
                   that chunk -> the 1-token chunk [e-1, e) with the same pieces (every
                   KVP group holding a piece still mirrors its new block ids); one query
                   at position e-1 over e keys, one slot written; other requests' chunks
                   (short prompts) run unchanged
    prefill done   SyntheticPrefillExecutor.fill_synthetic_kv: every rank writes N(0, 1)
                   into every block its mirror holds for the request (every local layer,
                   K and V), overwriting whatever the 1-token chunks wrote
                   (worker/synthetic_kv.py; `FillSyntheticKV` to worker processes);
                   `check_fill`: each rank's block count is its group's in the KV
                   manager, and what it read back is unit-variance noise
    decode steps   unchanged: the synthetic request decodes like any other

Any layout: the in-process executor (one device) or worker processes (tp x spp x kvp);
the plan rewrite happens on the driver, before the plan is sent. The sampled tokens are
meaningless (the keys are noise); the timings are those of a real decode over that many
keys. Results must say that the KV is synthetic.
"""

from __future__ import annotations

from dataclasses import replace

from mnemosyne.executor.multiproc import MultiProcExecutor
from mnemosyne.executor.uniproc import UniProcExecutor
from mnemosyne.kv_cache.manager import KVCacheManager
from mnemosyne.parallel.messages import SyntheticKVFilled
from mnemosyne.wire.plan import ChunkPlan, StepPlan, StepResult


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
    """Wraps an executor: prefill chunks of `synthetic_ids` skip their compute."""

    def __init__(self, inner: UniProcExecutor | MultiProcExecutor) -> None:
        if not isinstance(inner, UniProcExecutor | MultiProcExecutor):
            raise TypeError(f"synthetic KV needs an engine executor, got {type(inner).__name__}")
        self.inner = inner
        self.synthetic_ids: set[str] = set()
        self.num_skipped_tokens = 0

    @property
    def worker(self):  # -> Worker
        """The in-process worker (tests read its caches); worker processes have none here."""
        if not isinstance(self.inner, UniProcExecutor):
            raise TypeError("the workers run in other processes (tp * spp * kvp > 1)")
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

    def fill_synthetic_kv(self, request_id: str, seed: int) -> list[SyntheticKVFilled]:
        """N(0, 1) K/V into every block of the request on every rank, after every plan
        submitted so far; each rank's answer, by rank."""
        return self.inner.fill_synthetic_kv(request_id, seed)

    @property
    def num_rejected_messages(self) -> int:
        return self.inner.num_rejected_messages

    def check_health(self) -> None:
        self.inner.check_health()

    def shutdown(self) -> None:
        self.inner.shutdown()


def check_fill(kv_manager: KVCacheManager, request_id: str, filled: list[SyntheticKVFilled]) -> None:
    """Every rank filled exactly the blocks the KV manager gave its group, and read back
    unit-variance noise from them (`fill_synthetic_kv`'s answers); raises otherwise."""
    blocks = [0] * kv_manager.num_kvp_groups
    for piece in kv_manager.pieces(request_id):
        blocks[piece.group] += len(piece.block_ids)
    for f in filled:
        if f.num_blocks != blocks[f.group] or (f.num_blocks and not 0.5 < f.mean_square < 2.0):
            raise RuntimeError(
                f"synthetic fill of {request_id!r} on rank {f.rank} (group {f.group}): {f.num_blocks} blocks, "
                f"mean x^2 {f.mean_square:.3f}; the KV manager holds {blocks[f.group]} blocks there"
            )


def kv_tokens_by_group(kv_manager: KVCacheManager, num_tokens: dict[str, int]) -> list[int]:
    """Per KVP group: the KV tokens it holds of these requests (request id -> its first
    `num_tokens` positions, as the KV manager placed them)."""
    held = [0] * kv_manager.num_kvp_groups
    for rid, n in num_tokens.items():
        for piece in kv_manager.pieces(rid):
            held[piece.group] += max(0, min(piece.token_end, n) - piece.token_start)
    return held
