"""Log every Triton compile that happens after warm-up: a step that waits for the JIT stalls
every request of the batch (5-6 s measured on an H200 before the kernels stopped
specializing on per-step values; tests/test_no_recompile.py).

The worker calls `watch_jit_compiles()` once its warm-up and graph captures are done. Triton
then calls the returned watch before each compile and after it; the watch logs a warning
with the kernel, its specialization and the seconds it cost, and counts them
(`num_compiles`, `compile_s`). Triton's hooks are per process: the newest watch replaces
an older one of the same process (one worker per process; tests may build several).
"""

from __future__ import annotations

import logging
import time

import triton

logger = logging.getLogger(__name__)


class JitWatch:
    def __init__(self) -> None:
        self.num_compiles = 0
        self.compile_s = 0.0
        self._started: dict[str, float] = {}

    def before(
        self, *, key: str, repr: str, fn, compile, is_manual_warmup: bool, already_compiled: bool
    ) -> None:
        if not already_compiled:
            self._started[key] = time.perf_counter()
        return None  # (True would skip the compile)

    def after(
        self, *, key: str, repr: str, fn, compile, is_manual_warmup: bool, already_compiled: bool
    ) -> None:
        started = self._started.pop(key, None)
        if started is None:
            return None
        seconds = time.perf_counter() - started
        self.num_compiles += 1
        self.compile_s += seconds
        logger.warning(
            "Triton compiled a kernel variant after warm-up (%.2f s; every request of the step waited): %s",
            seconds, repr,
        )  # fmt: skip
        return None


def watch_jit_compiles() -> JitWatch:
    """Install a `JitWatch` on Triton's compile hooks (see the module docstring)."""
    watch = JitWatch()
    triton.knobs.runtime.jit_cache_hook = watch.before
    triton.knobs.runtime.jit_post_compile_hook = watch.after
    return watch


__all__ = ["JitWatch", "watch_jit_compiles"]
