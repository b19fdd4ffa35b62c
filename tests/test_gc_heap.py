"""gc_heap: start-up objects frozen out of the collector's walks, long collections logged."""

from __future__ import annotations

import gc
import logging

from mnemosyne.gc_heap import GCPauseLog, freeze_startup_heap, prepare_to_serve


def test_freeze_moves_the_live_heap_out_of_full_collections() -> None:
    try:
        startup = [{"i": i} for i in range(20000)]  # long-lived containers of a "start-up"
        num_frozen = freeze_startup_heap()
        # >=: a thread of an earlier test (an engine's) may freeze its own heap meanwhile
        assert num_frozen >= len(startup) and gc.get_freeze_count() >= num_frozen
        assert not any(obj is startup for obj in gc.get_objects(2))  # not walked any more
    finally:
        gc.unfreeze()


def test_pause_log_counts_collections_and_warns_of_long_ones(caplog) -> None:
    log = GCPauseLog("test process", warn_pause_s=0.0).install()
    try:
        with caplog.at_level(logging.WARNING, logger="mnemosyne.gc_heap"):
            gc.collect(2)
    finally:
        log.uninstall()
    assert log.num_collections >= 1 and log.num_long_pauses >= 1 and log.max_pause_s > 0
    assert "test process: a generation-2 garbage collection paused it" in caplog.text
    assert log._on_gc not in gc.callbacks
    quiet = GCPauseLog("quiet", warn_pause_s=60.0).install()
    try:
        gc.collect(0)
    finally:
        quiet.uninstall()
    assert quiet.num_collections >= 1 and quiet.num_long_pauses == 0


def test_prepare_to_serve_freezes_and_logs() -> None:
    try:
        log = prepare_to_serve("test process")
        assert gc.get_freeze_count() > 0 and log._on_gc in gc.callbacks
    finally:
        log.uninstall()
        gc.unfreeze()
