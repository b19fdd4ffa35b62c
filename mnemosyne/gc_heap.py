"""Keep Python's garbage collector out of the serving loop.

A full (generation 2) collection walks every tracked container object of the process. After
start-up an engine of the default model holds about 313K of them (torch, transformers, the
model's modules) and one full collection took 155 ms on the 2-core CI machine; a process that
only imports the API server, 200K and 92 ms (`benchmarks/probes/gc_pause.py`, 2026-11-30).
Python runs one whenever enough new long-lived objects have piled up, in the middle of
whatever step, token stream or collective is running at the time.

`freeze_startup_heap`, called by each of our processes once it is ready to serve (the API
server, the engine core, every worker), collects once and moves everything alive into the
permanent generation (`gc.freeze`). Later collections walk only what serving created: 0.014 ms
in the same engine after serving requests. `GCPauseLog` warns of any collection that still
takes long, and counts them. `mnemosyne bench serve` freezes its own heap (it imports torch
too) for the length of a run, so that its timestamps do not pause either.
"""

from __future__ import annotations

import gc
import logging
import time

logger = logging.getLogger(__name__)

DEFAULT_WARN_PAUSE_S = 0.010


def freeze_startup_heap() -> int:
    """Collect, then freeze every object alive now; returns the number frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class GCPauseLog:
    """Times every collection of this process (`gc.callbacks`); logs those over
    `warn_pause_s` with their generation, and keeps the count and the longest pause."""

    def __init__(self, process: str, warn_pause_s: float = DEFAULT_WARN_PAUSE_S) -> None:
        self.process = process
        self.warn_pause_s = warn_pause_s
        self.num_collections = 0
        self.num_long_pauses = 0
        self.max_pause_s = 0.0
        self._start_s: float | None = None

    def install(self) -> GCPauseLog:
        gc.callbacks.append(self._on_gc)
        return self

    def uninstall(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start_s = time.perf_counter()
            return
        if self._start_s is None:
            return
        pause_s, self._start_s = time.perf_counter() - self._start_s, None
        self.num_collections += 1
        self.max_pause_s = max(self.max_pause_s, pause_s)
        if pause_s > self.warn_pause_s:
            self.num_long_pauses += 1
            logger.warning(
                "%s: a generation-%d garbage collection paused it %.1f ms (%d objects collected)",
                self.process, info.get("generation", -1), 1e3 * pause_s, info.get("collected", 0),
            )  # fmt: skip


def prepare_to_serve(process: str) -> GCPauseLog:
    """`freeze_startup_heap` and an installed `GCPauseLog`: the last thing a process does
    before it serves."""
    num_frozen = freeze_startup_heap()
    logger.debug("%s: %d start-up objects frozen out of the garbage collector's walks", process, num_frozen)
    return GCPauseLog(process).install()
