"""Predicted time to prefill a prompt alone with adaptive chunks: T(n) seconds for tokens [0, n).

Used for LARS deadlines and slack: remaining prefill time = T(total) - T(done).

    table points   0, R, 2R, ...  (R = resolution_tokens)
    segment k      tokens [kR, (k+1)R): chunk c_k = the largest multiple of the granularity
                   (at most max_chunk_tokens) whose predicted step time, alone at prefix kR,
                   stays within the target (at least one granule);
                   T((k+1)R) = T(kR) + R * t(c_k, kR) / c_k
    between points T is linear.

The table grows on demand and is kept: one entry per R tokens of the longest prompt seen.
"""

from __future__ import annotations

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
        self._cumulative_s = [0.0]  # T at 0, R, 2R, ...

    def time_s(self, num_tokens: int) -> float:
        """Predicted seconds to prefill tokens [0, num_tokens) alone."""
        if num_tokens <= 0:
            return 0.0
        r = self.resolution_tokens
        k, frac = divmod(num_tokens, r)
        self._extend(k + 1)
        t0 = self._cumulative_s[k]
        return t0 + (self._cumulative_s[k + 1] - t0) * frac / r

    def remaining_s(self, num_tokens: int, num_done: int) -> float:
        return max(0.0, self.time_s(num_tokens) - self.time_s(num_done))

    def _extend(self, num_points: int) -> None:
        while len(self._cumulative_s) <= num_points:
            prefix = (len(self._cumulative_s) - 1) * self.resolution_tokens
            c = self._lone_chunk_tokens(prefix)
            if self.max_tokens_per_kvp_group is not None:  # clipped at the group boundary
                c = min(c, self.max_tokens_per_kvp_group - prefix % self.max_tokens_per_kvp_group)
            per_token_s = self._step_s(prefix, c) / c
            self._cumulative_s.append(self._cumulative_s[-1] + self.resolution_tokens * per_token_s)

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
