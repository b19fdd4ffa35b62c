"""Host and device timelines of CUDA graph replays, on one clock (probes only).

While a `ReplayTimeline` is recording, every CUDA graph replay is timed on the
host (perf_counter before and after the launch) and a timing event is recorded on the
stream just before it, so the device's start of each replay is known too. The two clocks
are aligned once at `start()`: after a full synchronize, an event is recorded and waited
for, and the host time at that moment is taken as the event's device time (error: the
wait's wake-up latency, tens of microseconds). Each replay row then reads::

    host_start_ms, host_end_ms   the launch call, on the host
    device_start_ms              when the device reached the replay (its preceding event)
    prior_done_at_return         whether everything queued before this replay had finished
                                 by the time the launch returned

Graphs replayed through `CUDAGraph.replay` (decode and mixed-step graphs) are caught by
patching the class; the piecewise graphs keep bound replay methods, so `start(piecewise)`
wraps their lists in place (rows labelled `piece i`). Everything is restored at `stop()`.

A launch that returns only once the device has caught up with it (host_end ~
device_start, prior_done_at_return true) was waiting for the device; one that returns
late with the device idle long before was held inside the driver.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mnemosyne.worker.piecewise_graph import PiecewiseGraphs


@dataclass
class _Replay:
    label: str
    graph: str  # "graph" (CUDAGraph.replay) or "piece i" (a piecewise graph)
    host_start_s: float
    host_end_s: float
    event: torch.cuda.Event
    prior_done_at_return: bool


@dataclass
class ReplayTimeline:
    """Records replays between `start()` and `stop()`; `mark(label)` names the next rows."""

    replays: list[_Replay] = field(default_factory=list)
    marks: list[tuple[str, float]] = field(default_factory=list)
    _label: str = ""
    _ref_event: torch.cuda.Event | None = None
    _ref_host_s: float = 0.0
    _original: Callable[[torch.cuda.CUDAGraph], None] | None = None
    _piecewise: PiecewiseGraphs | None = None
    _pieces: dict[int, list[Callable[[], object]]] = field(default_factory=dict)

    def _timed(self, graph: str, launch: Callable[[], object]) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        t0 = time.perf_counter()
        launch()
        t1 = time.perf_counter()
        self.replays.append(_Replay(self._label, graph, t0, t1, event, event.query()))

    def start(self, piecewise: PiecewiseGraphs | None = None) -> None:
        torch.cuda.synchronize()
        self._ref_event = torch.cuda.Event(enable_timing=True)
        self._ref_event.record()
        self._ref_event.synchronize()
        self._ref_host_s = time.perf_counter()
        original = torch.cuda.CUDAGraph.replay
        self._original = original
        torch.cuda.CUDAGraph.replay = lambda graph: self._timed("graph", lambda: original(graph))  # type: ignore[method-assign]
        if piecewise is not None:
            self._piecewise, self._pieces = piecewise, {size: list(fns) for size, fns in piecewise.pieces.items()}
            for fns in piecewise.pieces.values():
                fns[:] = [self._wrap(f"piece {i}", fn) for i, fn in enumerate(fns)]

    def _wrap(self, graph: str, fn: Callable[[], object]) -> Callable[[], None]:
        return lambda: self._timed(graph, fn)

    def mark(self, label: str) -> None:
        self._label = label
        self.marks.append((label, time.perf_counter()))

    def stop(self) -> list[dict]:
        """Restore replay and return the rows, times in ms from `start()`."""
        assert self._original is not None and self._ref_event is not None
        torch.cuda.CUDAGraph.replay = self._original  # type: ignore[method-assign]
        if self._piecewise is not None:
            for size, fns in self._pieces.items():
                self._piecewise.pieces[size][:] = fns
        torch.cuda.synchronize()
        ref = self._ref_event

        def ms(host_s: float) -> float:
            return round(1e3 * (host_s - self._ref_host_s), 3)

        rows = [
            {
                "label": r.label,
                "graph": r.graph,
                "host_start_ms": ms(r.host_start_s),
                "host_end_ms": ms(r.host_end_s),
                "launch_ms": round(1e3 * (r.host_end_s - r.host_start_s), 3),
                "device_start_ms": round(ref.elapsed_time(r.event), 3),
                "prior_done_at_return": r.prior_done_at_return,
            }
            for r in self.replays
        ]
        rows += [{"label": label, "mark_ms": ms(t)} for label, t in self.marks]
        return rows
