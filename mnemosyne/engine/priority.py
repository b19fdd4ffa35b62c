"""Which request goes first.

A policy maps a request to a sort key; smaller is more urgent. The scheduler sorts
by ``(*policy.key(request, now), admission_seq)``, where admission_seq is the order
in which `Scheduler.add_request` saw the request, so equal keys are always broken
the same way and any policy yields a deterministic total order.
"""

from __future__ import annotations

from typing import Protocol

from mnemosyne.request import Request


class PriorityPolicy(Protocol):
    def key(self, request: Request, now: float) -> tuple:
        """Sort key of `request` at time `now`; smaller = more urgent."""
        ...


class FCFSPriority:
    """First come, first served: by arrival_time (ties: admission order, added by the scheduler)."""

    def key(self, request: Request, now: float) -> tuple:
        return (request.arrival_time,)
