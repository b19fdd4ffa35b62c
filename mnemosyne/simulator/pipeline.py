"""Stage-level events of the sequence pipeline (SPP) in virtual time.

A micro-batch crosses stages 0 .. spp-1 in order; a stage works on one micro-batch at a
time, in submission order. The latency model gives a micro-batch's time to cross all
stages (`LatencyModel.step_time_s`); each stage takes an equal share of it::

    stage s of micro-batch i:  start = max(end of stage s-1 of i, end of stage s of i-1)
                               end   = start + step_time / spp

So with spp micro-batches in flight a new one enters stage 0 as soon as the previous
one leaves it, and the results come back in order (what `LLMEngine.step` waits for).
"""

from __future__ import annotations


class StagePipeline:
    def __init__(self, num_stages: int) -> None:
        if num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {num_stages}")
        self.num_stages = num_stages
        self._stage_free_s = [0.0] * num_stages  # when each stage finishes its last micro-batch

    def submit(self, now_s: float, step_time_s: float) -> float:
        """Enter a micro-batch at `now_s`; returns when it leaves the last stage."""
        stage_s = step_time_s / self.num_stages
        t = now_s
        free = self._stage_free_s
        for s in range(self.num_stages):
            t = max(t, free[s]) + stage_s
            free[s] = t
        return t
