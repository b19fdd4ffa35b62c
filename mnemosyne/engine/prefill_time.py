"""Predicted time to prefill a prompt alone with adaptive chunks: T(n) seconds for tokens [0, n).

Used for LARS deadlines and slack: remaining prefill time = T(total) - T(done).

The table walks the prompt as the scheduler would, from one breakpoint s to the next
(R = resolution_tokens)::

    c      = the largest multiple of the granularity (at most max_chunk_tokens, clipped at a
             KVP group boundary) whose predicted step time, alone at prefix s, stays within
             the target (at least one granule)
    c >= R:  one whole chunk      s' = s + c,  T(s') = T(s) + t(c, s)          (exact)
    c <  R:  R tokens at its rate  s' = s + R,  T(s') = T(s) + R * t(c, s) / c
    between breakpoints T is linear.

Large chunks (a target with room) are thus stepped exactly, and a long prompt of small
chunks costs one model search per R tokens. The table grows on demand and is kept.
"""

from __future__ import annotations

import bisect

from mnemosyne.engine.step_load import add_chunk, chunk_spans
from mnemosyne.latency.composition import GroupLoad, StepComposition
from mnemosyne.latency.model import LatencyModel


def lone_chunk_composition(
    num_kvp_groups: int, max_tokens_per_kvp_group: int | None, start: int, num_tokens: int
) -> StepComposition:
    """A chunk alone in its step, its pieces on groups 0, 1, 2, ... (clipped to a group boundary)."""
    t = max_tokens_per_kvp_group
    if t is not None:
        num_tokens = min(num_tokens, t - start % t)
    groups = [GroupLoad()] * num_kvp_groups
    spans = chunk_spans(start, num_tokens, t)
    for piece, prefix, owns in spans:
        g = piece % num_kvp_groups
        groups[g] = add_chunk(groups[g], num_tokens, prefix, owns, sample=owns)
    return StepComposition(tuple(groups), num_tokens if len(spans) > 1 else 0)


class PrefillTimeTable:
    def __init__(
        self,
        model: LatencyModel,
        target_step_s: float,
        num_kvp_groups: int = 1,
        max_tokens_per_kvp_group: int | None = None,
        granularity_tokens: int = 32,
        max_chunk_tokens: int = 8192,
        resolution_tokens: int = 2048,
    ) -> None:
        self.model = model
        self.target_step_s = target_step_s
        self.num_kvp_groups = num_kvp_groups
        self.max_tokens_per_kvp_group = max_tokens_per_kvp_group
        self.granularity_tokens = granularity_tokens
        self.max_chunk_tokens = max(max_chunk_tokens, granularity_tokens)
        self.resolution_tokens = resolution_tokens
        self._tokens = [0]  # breakpoints s (ascending)
        self._seconds = [0.0]  # T(s)
        self._chunk_s = [0.0]  # the step time of the chunk that ends at (or steps through) s

    def time_s(self, num_tokens: int) -> float:
        """Predicted seconds to prefill tokens [0, num_tokens) alone."""
        if num_tokens <= 0:
            return 0.0
        self._extend(num_tokens)
        i = bisect.bisect_right(self._tokens, num_tokens) - 1  # _tokens[i] <= num_tokens < _tokens[i + 1]
        if self._tokens[i] == num_tokens:
            return self._seconds[i]
        s0, s1 = self._tokens[i], self._tokens[i + 1]
        t0, t1 = self._seconds[i], self._seconds[i + 1]
        return t0 + (t1 - t0) * (num_tokens - s0) / (s1 - s0)

    def last_chunk_s(self, num_tokens: int) -> float:
        """The step time of the chunk that holds token num_tokens - 1."""
        if num_tokens <= 0:
            return 0.0
        self._extend(num_tokens)
        return self._chunk_s[bisect.bisect_left(self._tokens, num_tokens)]

    def remaining_s(self, num_tokens: int, num_done: int) -> float:
        return max(0.0, self.time_s(num_tokens) - self.time_s(num_done))

    def _extend(self, num_tokens: int) -> None:
        """Breakpoints until the last one is past num_tokens."""
        while self._tokens[-1] <= num_tokens:
            prefix = self._tokens[-1]
            c = self._lone_chunk_tokens(prefix)
            if self.max_tokens_per_kvp_group is not None:  # clipped at the group boundary
                c = min(c, self.max_tokens_per_kvp_group - prefix % self.max_tokens_per_kvp_group)
            step_s = self._step_s(prefix, c)
            if c >= self.resolution_tokens:
                self._tokens.append(prefix + c)
                self._seconds.append(self._seconds[-1] + step_s)
            else:
                self._tokens.append(prefix + self.resolution_tokens)
                self._seconds.append(self._seconds[-1] + self.resolution_tokens * step_s / c)
            self._chunk_s.append(step_s)

    def _step_s(self, prefix: int, num_tokens: int) -> float:
        comp = lone_chunk_composition(self.num_kvp_groups, self.max_tokens_per_kvp_group, prefix, num_tokens)
        return self.model.step_time_s(comp)

    def _lone_chunk_tokens(self, prefix: int) -> int:
        g = self.granularity_tokens
        lo, hi = 1, self.max_chunk_tokens // g  # granules; the answer is at least one granule
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._step_s(prefix, mid * g) <= self.target_step_s:
                lo = mid
            else:
                hi = mid - 1
        return lo * g
