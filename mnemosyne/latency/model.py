"""The latency-model protocol shared by the scheduler and the simulator."""

from __future__ import annotations

from typing import Protocol

from mnemosyne.latency.composition import StepComposition
from mnemosyne.latency.shape import Layout


class LatencyModel(Protocol):
    layout: Layout

    def step_time_s(self, composition: StepComposition) -> float:
        """Predicted seconds for one micro-batch to cross every pipeline stage.

        With SPP a decode's next token crosses all stages, so checking this against
        the TBT target is the same as a per-stage budget of target / spp. With KVP
        the busiest group's sub-batch sets the time, plus the merge all-gather.
        """
        ...
