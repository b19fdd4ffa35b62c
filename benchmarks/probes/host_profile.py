"""Python-level host profiles for the probes: where a launch's host time goes."""

from __future__ import annotations

import cProfile
import io
import pstats
from collections.abc import Callable

import torch


def cprofile_tottime(fn: Callable[[], object], repeats: int = 3, rows: int = 25) -> str:
    """cProfile of `repeats` calls of `fn` (and the device finishing them), the `rows`
    functions with the most time of their own."""
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    profile.disable()
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(rows)
    return out.getvalue()
