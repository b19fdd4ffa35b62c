"""Log every Triton compile that happens after warm-up: a step that waits for the JIT stalls
every request of the batch (5-6 s measured on an H200 before the kernels stopped
specializing on per-step values; tests/test_no_recompile.py).

The worker calls `watch_jit_compiles()` once its warm-up and graph captures are done. Triton
then calls the returned watch before each compile and after it; the watch logs a warning
with the kernel, its signature (every argument's type as Triton specialized it, e.g.
`*bf16`, `i32`, and the constexprs) and the seconds it cost, and counts them
(`num_compiles`, `compile_s`). Triton 3.6's own `repr` of the variant pairs the arguments
with the wrong part of its key (it printed "(o_ptr: ()" on an H200), so it is only the
fallback. Triton's hooks are per process: the newest watch replaces
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
            seconds, describe_variant(fn, compile, repr),
        )  # fmt: skip
        return None


def describe_variant(fn: object, compile: object, fallback: str) -> str:
    """`name(arg: type [attrs], ..., CONST=value)` from the hook's compile arguments (Triton
    3.6: `signature` {name: type, "constexpr" for constexprs}, `constants` and `configs[0]`
    keyed by argument paths such as (3,)); else `fallback`."""
    try:
        signature = compile["signature"]  # type: ignore[index]
        constants = compile.get("constants") or {}  # type: ignore[union-attr]
        configs = compile.get("configs") or [{}]  # type: ignore[union-attr]
        attrs = configs[0] or {}
        parts = []
        for i, (arg, ty) in enumerate(signature.items()):
            if ty == "constexpr":
                parts.append(f"{arg}={constants.get((i,))}")
            else:
                extra = attrs.get((i,))
                parts.append(f"{arg}: {ty}" + (f" {extra}" if extra else ""))
        name = getattr(fn, "name", None) or fallback.split("[", 1)[0]
        return f"{name}({', '.join(parts)})"
    except (KeyError, TypeError, AttributeError):
        return fallback


def watch_jit_compiles() -> JitWatch:
    """Install a `JitWatch` on Triton's compile hooks (see the module docstring)."""
    watch = JitWatch()
    triton.knobs.runtime.jit_cache_hook = watch.before
    triton.knobs.runtime.jit_post_compile_hook = watch.after
    return watch


__all__ = ["JitWatch", "describe_variant", "watch_jit_compiles"]
