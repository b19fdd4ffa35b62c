"""`mnemosyne profile --model DIR [--load-format dummy] [--device cuda|cpu] [--tp --spp --kvp]
[--grid quick|default|tiny] [--block-layout contiguous|scattered] [--step-timing serial|pipelined]
(default: the engine's own, pipelined with async scheduling on one device)
--out FILE`: measure, fit, write the JSON and cache it, so every
engine with the same device, model shape, layout and dtype picks it up."""

from __future__ import annotations

import argparse
from pathlib import Path

from mnemosyne.latency.profile_store import profiles_dir, save_profile
from mnemosyne.profiling.profiler import GridKind, StepTiming
from mnemosyne.profiling.synthetic import BlockLayout


def add_profile_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("profile")
    g.add_argument("--out", required=True, help="write the profile JSON here")
    g.add_argument(
        "--grid",
        default=GridKind.DEFAULT.value,
        choices=[k.value for k in GridKind],
        help="quick: ~2 min for an 8B model on one H200; default: at most ~10 min; tiny: tests",
    )
    g.add_argument(
        "--block-layout",
        default=BlockLayout.CONTIGUOUS.value,
        choices=[k.value for k in BlockLayout],
        help="synthetic KV blocks: contiguous (one run per sequence) or scattered (every prefix "
        "gathered by the cuDNN path, as when a long prompt's blocks interleave with decodes')",
    )
    g.add_argument(
        "--step-timing",
        default=None,
        choices=[k.value for k in StepTiming],
        help="serial: submit -> result, one step in flight; pipelined: two in flight, as with "
        "async scheduling (result -> next result). Default: the engine's own (pipelined where "
        "it schedules asynchronously: one device)",
    )
    g.add_argument("--no-cache", action="store_true", help="do not copy the profile into the cache")


def cmd_profile(ns: argparse.Namespace) -> int:
    from mnemosyne.cli_args import engine_args_from
    from mnemosyne.config import parse_enum
    from mnemosyne.models.default_model import cache_dir
    from mnemosyne.profiling.profiler import run_profile

    profile = run_profile(
        engine_args_from(ns),
        parse_enum(GridKind, ns.grid, "--grid"),
        block_layout=parse_enum(BlockLayout, ns.block_layout, "--block-layout"),
        timing=None if ns.step_timing is None else parse_enum(StepTiming, ns.step_timing, "--step-timing"),
    )
    out = Path(ns.out)
    save_profile(profile, out)
    err = profile.info["fit_error"]
    print(
        f"wrote {out}: {len(profile.info['samples'])} steps in {profile.info['elapsed_s']} s, "
        f"fit error median {100 * err['median_rel']:.1f}%, p95 {100 * err['p95_rel']:.1f}%"
    )
    if not ns.no_cache:
        cached = profiles_dir(cache_dir()) / profile.key.file_name()
        save_profile(profile, cached)
        print(f"cached as {cached}")
    return 0
