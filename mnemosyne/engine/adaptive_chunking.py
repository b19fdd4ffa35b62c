"""Adaptive chunk sizes: the largest chunk whose predicted step time stays within the target.

Per step (the scheduler asks in its order: decodes first, then prefills by priority)::

    decode                  always 1 token; its predicted cost joins the step's load
    prefill chunk           cap  = min(num_pending, budget_left, tokens to the KVP group boundary,
                                       graph room while any request decodes (below))
                            sizes: multiples of the granularity up to cap, plus cap itself when it
                                   ends the prompt or sits on the group boundary (the remainder)
                            n    = the largest size with step_time(load + chunk(n)) <= allowed_s,
                                   by binary search (step time grows with n)
                            n = 0 when none fits, except for the step's first prefill, which
                                always progresses (nothing starves):
                                  the largest multiple of the small granule below the
                                  granularity that fits (late in a long prefill, with many
                                  decodes); small granule = min(block size, SMALL_CHUNK_TOKENS =
                                  16): one 16-row query tile of the chunk kernel, 64 rows at GQA
                                  4. Measured on an H200 (8B shape, whole model): 16 tokens
                                  after 512K keys cost 23.0 ms against 27.7 ms for 32
                                  (benchmarks/results/chunk_sweep/page_tiles_8b_long_*), so a
                                  step that 32 tokens push over the target often fits with 16.
                                  Else min(min_chunk_tokens, cap): even the small granule
                                  overshoots, the target cannot be met this step, and the
                                  minimum chunk keeps the prefill moving. Both cases are
                                  counted (num_small_chunks, num_overshoots); an overshoot is
                                  logged once per request
    allowed_s               target_step_s (the TBT SLO) while any request decodes (in this step or
                            in flight); prefill_only_step_s when none does: with no token gap to
                            protect a step need not be short, and small chunks only waste time
                            (each step reads the weights and the prefix again). With SPP the step
                            time is the time to cross all stages, i.e. a per-stage budget of
                            target / spp; with KVP the busiest group's sub-batch sets it
                            (`latency/model.py`).
    graph room              max_decoding_step_tokens - tokens scheduled so far - decodes still to
                            come (decode aheads are asked for in priority order among the
                            prefills, after some of them), while any request decodes
                            (None: no such cap; the engine sets it to the largest
                            piecewise CUDA-graph step where graphs run). A step past it runs
                            eagerly, and those steps made the TBT tail on an H200: in four runs
                            of the 1B mixed scenario (32 decodes, a 256K prompt; the step logs in
                            benchmarks/results/session13_h200x2_2026-11-30/), 21 of 106 eager
                            steps of 1.1K-4.8K tokens took over 30.5 ms (up to 75 ms, 2.5x their
                            prediction), against 12 of 1883 graph steps. When the room is under
                            one granule, a later prefill gets nothing, and the step's first
                            prefill is sized without the cap (the decodes alone fill the graph;
                            minimum progress as below).
    space sharing (LARS)    a prefill with >= long_prefill_threshold_tokens computed is long: at most
                            one long prefill per KVP group (its owner group) per step, and it may
                            use only share = 1 - min(max(slack fraction, 0), 0.5) of the time left:
                            allowed_s = now_s + share * (step target - now_s), now_s the load so far

The policy only predicts and counts; the scheduler still owns the KV allocation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from mnemosyne.engine.priority import LARSPriority
from mnemosyne.engine.step_load import StepLoadBuilder
from mnemosyne.kv_cache.manager import KVCacheManager
from mnemosyne.latency.model import LatencyModel
from mnemosyne.request import Request

logger = logging.getLogger(__name__)

MAX_LONG_SHARE_SLACK = 0.5  # a long prefill with slack to spare yields at most half of the step
SMALL_CHUNK_TOKENS = 16  # the largest small granule of the minimum-progress rule (module docstring)


class AdaptiveChunkPolicy:
    def __init__(
        self,
        model: LatencyModel,
        kv_manager: KVCacheManager,
        target_step_s: float,
        prefill_only_step_s: float | None = None,
        granularity_tokens: int = 32,
        min_chunk_tokens: int = 32,
        lars: LARSPriority | None = None,
        long_prefill_threshold_tokens: int = 262144,
        max_decoding_step_tokens: int | None = None,
    ) -> None:
        if target_step_s <= 0:
            raise ValueError(f"target_step_s must be positive, got {target_step_s}")
        if max_decoding_step_tokens is not None and max_decoding_step_tokens < 1:
            raise ValueError(f"max_decoding_step_tokens must be >= 1, got {max_decoding_step_tokens}")
        if granularity_tokens < 1 or min_chunk_tokens < 1:
            raise ValueError(
                f"granularity and min chunk must be >= 1, got {granularity_tokens}, {min_chunk_tokens}"
            )
        self.model = model
        self.kv_manager = kv_manager
        self.target_step_s = target_step_s
        self.prefill_only_step_s = max(prefill_only_step_s or target_step_s, target_step_s)
        self.granularity_tokens = granularity_tokens
        self.min_chunk_tokens = min_chunk_tokens
        self.lars = lars  # None: no space sharing
        self.long_prefill_threshold_tokens = long_prefill_threshold_tokens
        self.max_decoding_step_tokens = max_decoding_step_tokens
        self._now = 0.0
        self._num_tokens = 0  # scheduled so far this step
        self._num_decodes_scheduled = 0  # of the step's num_decoding (decodes and decode aheads)
        self._load = StepLoadBuilder(kv_manager)
        self._any_prefill = False
        self._num_decoding = 0
        self._long_groups: set[int] = set()
        self.num_small_chunks = 0  # first prefills of a step below the granularity, within the target
        self.num_overshoots = 0  # first prefills of a step whose predicted time exceeds the target
        self._reported: set[str] = set()  # requests already logged for an overshoot

    # ---- ChunkPolicy -------------------------------------------------------------------

    def begin_step(self, now: float, num_decoding: int) -> None:
        self._now = now
        self._num_decoding = num_decoding
        self._load = StepLoadBuilder(self.kv_manager)
        self._any_prefill = False
        self._long_groups = set()
        self._num_tokens = 0
        self._num_decodes_scheduled = 0

    def on_scheduled(self, request: Request, start: int, num_tokens: int, sample: bool) -> None:
        self._load.add(request, start, num_tokens, sample)
        self._num_tokens += num_tokens
        if num_tokens == 1 and start >= request.num_tokens - 1:  # a decode, or a decode ahead
            self._num_decodes_scheduled += 1
        if request.is_prefill:
            self._any_prefill = True
            if self.is_long(request):
                self._long_groups.add(self._load.owner_group(request, start))

    def chunk_size(self, request: Request, num_pending: int, budget_left: int) -> int:
        start = request.num_dispatched_tokens
        boundary = self.kv_manager.num_tokens_to_group_end(request.request_id, start)
        cap = min(num_pending, budget_left, boundary if boundary is not None else num_pending)
        if cap <= 0:
            return 0
        if not request.is_prefill:
            return 1  # a decode: always packed
        if self._num_decoding and self.max_decoding_step_tokens is not None:
            decodes_to_come = max(0, self._num_decoding - self._num_decodes_scheduled)
            room = self.max_decoding_step_tokens - self._num_tokens - decodes_to_come
            if room >= min(self.granularity_tokens, cap):
                cap = min(cap, room)
            elif self._any_prefill:
                return 0  # the step stays graph-sized: another prefill already progresses
        allowed_s = self.step_target_s()
        if self.lars is not None and self.is_long(request):
            if self._load.owner_group(request, start) in self._long_groups:
                return 0  # one long prefill per KVP group per step
            allowed_s = self._long_allowed_s(request)
        ends_piece = cap == num_pending or cap == boundary
        n = self._largest_fitting(request, start, cap, ends_piece, num_pending, allowed_s)
        if n == 0 and not self._any_prefill:
            n = self._min_progress(request, start, cap, num_pending, allowed_s)
        return n

    # ---- queries (metrics, tests) ------------------------------------------------------

    def is_long(self, request: Request) -> bool:
        return request.num_computed_tokens >= self.long_prefill_threshold_tokens

    def step_target_s(self) -> float:
        """The time this step may take: the TBT target while any request decodes."""
        return self.target_step_s if self._num_decoding else self.prefill_only_step_s

    def predicted_step_s(self) -> float:
        """The predicted time of what was scheduled so far this step."""
        return self.model.step_time_s(self._load.composition())

    # ---- internals ---------------------------------------------------------------------

    def _long_allowed_s(self, request: Request) -> float:
        assert self.lars is not None
        slack = self.lars.slack_fraction(request, self._now)
        share = 1.0 - min(max(slack, 0.0), MAX_LONG_SHARE_SLACK)
        so_far = self.predicted_step_s()
        return so_far + share * max(0.0, self.step_target_s() - so_far)

    def _fits(self, request: Request, start: int, n: int, num_pending: int, allowed_s: float) -> bool:
        sample = n == num_pending
        return self.model.step_time_s(self._load.with_chunk(request, start, n, sample)) <= allowed_s

    def _min_progress(self, request: Request, start: int, cap: int, num_pending: int, allowed_s: float) -> int:
        """The first prefill of a step when no granule fits: a smaller chunk that still fits,
        else min_chunk_tokens over the target (see the module docstring)."""
        small = min(self.kv_manager.block_size, SMALL_CHUNK_TOKENS)
        smallest = min(small, self.granularity_tokens, cap)
        if small < self.granularity_tokens:
            small_cap = min(cap, self.granularity_tokens - 1)
            n = self._largest_fitting(request, start, small_cap, small_cap == cap, num_pending, allowed_s, small)
            if n:
                self.num_small_chunks += 1
                return n
        n = min(self.min_chunk_tokens, cap)
        self.num_overshoots += 1
        if request.request_id not in self._reported:
            self._reported.add(request.request_id)
            predicted_s = self.model.step_time_s(self._load.with_chunk(request, start, n, n == num_pending))
            logger.warning(
                "request %s: even a %d-token chunk at prefix %d with %d decoding is predicted at %.1f ms, "
                "over the %.1f ms step target; prefilling %d tokens per step over the target (logged once)",
                request.request_id, smallest, start, self._num_decoding, 1e3 * predicted_s,
                1e3 * allowed_s, n,
            )  # fmt: skip
        return n

    def _largest_fitting(
        self, request: Request, start: int, cap: int, ends_piece: bool, num_pending: int, allowed_s: float,
        granularity: int | None = None,
    ) -> int:  # fmt: skip
        g = granularity or self.granularity_tokens
        if ends_piece and cap % g and self._fits(request, start, cap, num_pending, allowed_s):
            return cap  # the remainder (or the piece's tail) is the largest size
        return largest_fitting_multiple(
            lambda n: self._fits(request, start, n, num_pending, allowed_s), cap, g
        )


def largest_fitting_multiple(fits: Callable[[int], bool], cap: int, granularity: int) -> int:
    """The largest multiple of `granularity` up to `cap` tokens that `fits`, 0 when none does,
    by binary search (a step's time grows with its chunk, so `fits` holds up to a size)."""
    lo, hi = 0, cap // granularity  # granules; lo always fits (0 tokens = nothing added)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid * granularity):
            lo = mid
        else:
            hi = mid - 1
    return lo * granularity
