"""Hidden states from one pipeline stage to the next (SPP), for one rank.

The residual stream is identical on the TP ranks of a stage, so each TP rank sends only its
1/tp slice of the hidden dim to its peer in the next stage, which all-gathers it over TP:
P2P bytes per stage boundary fall by tp::

    stage s, tp rank t   hidden [n, H] -> columns [t*H/tp, (t+1)*H/tp)  --isend-->  stage s+1, tp rank t
    stage s+1            recv [n, H/tp] -> all-gather over TP -> [n, H]
    (H % tp != 0: the whole [n, H] is sent and nothing is gathered)

At most one send is in flight: the next waits for it, as does shutdown.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mnemosyne.parallel.comm import all_gather, recv_from_stage, send_to_stage
from mnemosyne.parallel.groups import ProcessGroups


class StageLink:
    def __init__(self, pg: ProcessGroups, hidden_size: int, dtype: torch.dtype, device: torch.device) -> None:
        self.pg = pg
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.device = device
        self._pending: tuple[dist.Work, torch.Tensor] | None = None  # the send in flight and its buffer

    def _slice(self) -> tuple[int, int]:
        """(first column, columns) of the hidden dim this TP rank sends."""
        h, tp = self.hidden_size, self.pg.tp.size
        if h % tp:
            return 0, h
        return self.pg.tp.rank_in_group * (h // tp), h // tp

    def send(self, hidden: torch.Tensor) -> None:
        """`hidden` [num_tokens, hidden_size] to this rank's peer in the next stage."""
        assert self.pg.next_stage_rank is not None
        self.wait()
        start, size = self._slice()
        # A copy, never a view: `hidden` may be a graph's static buffer, which the next step
        # overwrites while this send may still be in flight.
        part = hidden.narrow(1, start, size).clone(memory_format=torch.contiguous_format)
        # part: [num_tokens, hidden_size / tp]
        work = send_to_stage(part, self.pg.next_stage_rank, self.pg.next_stage_group)
        self._pending = (work, part) if work is not None else None

    def recv(self, num_tokens: int) -> torch.Tensor:
        """The previous stage's hidden states: [num_tokens, hidden_size]."""
        assert self.pg.prev_stage_rank is not None
        h = self.hidden_size
        _, size = self._slice()
        src, process_group = self.pg.prev_stage_rank, self.pg.prev_stage_group
        part = recv_from_stage((num_tokens, size), self.dtype, self.device, src, process_group)
        if size == h:
            return part  # the whole hidden state was sent (hidden_size % tp != 0)
        if num_tokens == 0:
            return part.new_empty(0, h)  # nothing to gather (every TP rank skips it alike)
        return all_gather(part, self.pg.tp, dim=1)  # [num_tokens, hidden_size]

    def wait(self) -> None:
        """Until the send in flight, if any, is done."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None
