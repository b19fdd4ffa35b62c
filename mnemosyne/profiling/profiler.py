"""Measure step times over a grid through the real executor, fit a `FittedLatencyModel`.

grid points   single chunks (c, P), decode batches (B, L), mixed steps (B decodes + a chunk)
              P, L up to the KV capacity; points whose roofline time exceeds max_step_s
              are skipped (they bound the run time and lie far past any step target)
one point     warm-up run (JIT, cuDNN plans, CUDA graph capture), then `repeats` timed
              runs, median (`StepTiming`):
                SERIAL     submit -> result, one step in flight: host + device
                PIPELINED  two steps in flight, as the engine's async scheduling runs them:
                           result -> next result, max(host, device) once the device is busy
              default: the engine's own mode (`default_step_timing`), PIPELINED where it
              schedules asynchronously (one device), else SERIAL. Measured on an H200
              (benchmarks/results/README.md, "Fifth session: simulator validation"): the
              engine's decode-only token gaps are the pipelined profiles' within 2.5%, the
              serial ones' +9-18%
fit           weighted NNLS (`latency/fitted.py`); each KVP sample is keyed by the group
              the roofline calls busiest; on CUDA with the kernel backend the fit also gets
              the backend's chunk cost table (`chunk_attention_cost`), stored in the profile
"""

from __future__ import annotations

import enum
import importlib.metadata
import random
import statistics
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from mnemosyne.engine.args import EngineArgs
from mnemosyne.engine.policies import profile_key
from mnemosyne.errors import ConfigError
from mnemosyne.latency.composition import StepComposition
from mnemosyne.latency.fitted import ChunkAttentionCost, fit_latency_model
from mnemosyne.latency.kernel_cost import H200_COST
from mnemosyne.latency.profile_store import LatencyProfile, ProfileKey
from mnemosyne.latency.roofline import RooflineLatencyModel, device_spec_for
from mnemosyne.latency.shape import Layout, ModelShape
from mnemosyne.profiling.synthetic import BlockLayout, SyntheticPlanner, SyntheticSeq


class StepTiming(enum.Enum):
    SERIAL = "serial"
    PIPELINED = "pipelined"


def default_step_timing(config) -> StepTiming:
    """How the engine of `config` runs its steps: PIPELINED with async scheduling, else SERIAL."""
    return StepTiming.PIPELINED if config.scheduler.async_scheduling else StepTiming.SERIAL


class GridKind(enum.Enum):
    TINY = "tiny"  # CPU tests: a few points on a tiny model
    QUICK = "quick"  # about 2 minutes for the 8B shape on one H200
    DEFAULT = "default"  # at most about 10 minutes


@dataclass(frozen=True)
class ProfileGrid:
    chunk_sizes: tuple[int, ...]
    prefix_fractions: tuple[float, ...]  # of the KV capacity
    decode_batches: tuple[int, ...]
    decode_kv_fractions: tuple[float, ...]
    num_mixed: int
    repeats: int
    max_step_s: float


GRIDS = {
    GridKind.TINY: ProfileGrid((4, 16), (0.0, 0.5), (1, 4), (0.1,), 4, 1, 10.0),
    GridKind.QUICK: ProfileGrid(
        (32, 128, 512, 2048, 8192),
        (0.0, 0.01, 0.08, 0.3, 0.9),
        (1, 8, 32, 128),
        (0.001, 0.04, 0.3),
        40,
        3,
        0.4,
    ),
    GridKind.DEFAULT: ProfileGrid(
        (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192),
        (0.0, 0.005, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 0.9),
        (1, 4, 16, 32, 64, 128, 256),
        (0.001, 0.01, 0.04, 0.1, 0.3, 0.9),
        200,
        5,
        1.0,
    ),
}


@dataclass(frozen=True)
class Measurement:
    seqs: tuple[SyntheticSeq, ...]
    composition: StepComposition
    measured_s: float


def library_versions() -> dict[str, str]:
    out = {}
    for name in ("torch", "triton", "transformers", "mnemosyne"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    import torch

    if torch.backends.cudnn.is_available():
        out["cudnn"] = str(torch.backends.cudnn.version())
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    return out


def grid_points(
    grid: ProfileGrid, capacity: int, max_seqs: int, seed: int = 0
) -> list[tuple[SyntheticSeq, ...]]:
    """Every step of the grid, in tokens (capacity = KV tokens one synthetic step may use)."""
    points: list[tuple[SyntheticSeq, ...]] = []
    for c in grid.chunk_sizes:
        for f in grid.prefix_fractions:
            p = int(f * capacity)
            if p + c <= capacity:
                points.append((SyntheticSeq(c, p),))
    for b in grid.decode_batches:
        for f in grid.decode_kv_fractions:
            kv = max(1, int(f * capacity / b))
            if b <= max_seqs and b * (kv + 1) <= capacity:
                points.append(tuple(SyntheticSeq(1, kv) for _ in range(b)))
    rng = random.Random(seed)
    for _ in range(grid.num_mixed):
        b = rng.choice([0, *grid.decode_batches])
        b = min(b, max_seqs - 1)
        c = rng.choice(grid.chunk_sizes)
        left = capacity - c
        decode_kv = [rng.randint(1, max(1, left // (2 * max(b, 1)))) for _ in range(b)]
        p = rng.randint(0, max(0, left - sum(decode_kv) - b))
        points.append((*(SyntheticSeq(1, kv) for kv in decode_kv), SyntheticSeq(c, p)))
    return points


def run_profile(
    args: EngineArgs,
    grid_kind: GridKind,
    log=print,
    block_layout: BlockLayout = BlockLayout.CONTIGUOUS,
    timing: StepTiming | None = None,
) -> LatencyProfile:
    """Start an engine sized for the grid, profile it, stop it (timing None: the engine's own)."""
    from mnemosyne.engine.llm_engine import LLMEngine

    grid = GRIDS[grid_kind]
    max_seqs = max(grid.decode_batches) + 1
    args = replace(
        args,
        max_num_batched_tokens=max(args.max_num_batched_tokens, max(grid.chunk_sizes) + max_seqs),
        max_num_seqs=max(args.max_num_seqs, max_seqs),
        chunk_policy="fixed",
        scheduling_policy="fcfs",
    )
    engine = LLMEngine.from_args(args)
    try:
        return profile_engine(engine, grid_kind, log, block_layout, timing)
    finally:
        engine.shutdown()


def chunk_attention_cost(
    shape: ModelShape, layout: Layout, block_size: int, page_tiles_keys: int = 64
) -> ChunkAttentionCost:
    """The chunk costs the CUDA kernel backend picks paths by (`KernelBackend`'s default table),
    for this shape's per-GPU heads; page-aligned tiles where the block size is a multiple of
    `page_tiles_keys` (`kernels/chunk_tma_attention.fits_page_tiles`: 64 keys in 16-bit)."""
    return ChunkAttentionCost(
        H200_COST, shape.num_layers, shape.num_heads // layout.tp, shape.head_dim,
        page_tiles=block_size % page_tiles_keys == 0, tile_tokens=shape.chunk_tile_tokens,
    )  # fmt: skip


def engine_chunk_attention_cost(config) -> ChunkAttentionCost | None:
    """`chunk_attention_cost` where the engine's workers run the kernel backend with cuDNN
    (CUDA, `attention_backend` auto or kernels), else None (no kernel feature)."""
    from mnemosyne.config import AttentionBackendKind
    from mnemosyne.kernels.chunk_tma_attention import tma_step_keys

    if not config.device.startswith("cuda") or config.attention_backend is AttentionBackendKind.REFERENCE:
        return None
    key = profile_key(config)
    return chunk_attention_cost(key.shape, key.layout, config.cache.block_size, tma_step_keys(config.model.dtype))


def synthetic_setup(
    engine, block_layout: BlockLayout = BlockLayout.CONTIGUOUS, timing: StepTiming = StepTiming.SERIAL
) -> tuple[ProfileKey, RooflineLatencyModel, SyntheticPlanner, int]:
    """The key, roofline and synthetic planner of an idle engine, and the KV tokens one step may use.
    PIPELINED timing (`measure_all`) keeps two plans live and needs async scheduling."""
    config = engine.config
    if timing is StepTiming.PIPELINED and not config.scheduler.async_scheduling:
        raise ConfigError("pipelined step timing needs async scheduling (spp = 1)")
    key = profile_key(config)
    cache = config.cache
    roofline = RooflineLatencyModel(key.shape, key.layout, device_spec_for(key.device_name))
    max_live_plans = 2 if timing is StepTiming.PIPELINED else 1
    planner = SyntheticPlanner(
        cache.block_size, cache.num_blocks_per_group, cache.max_tokens_per_kvp_group, block_layout, max_live_plans
    )
    capacity = min(cache.num_blocks_per_group) * cache.block_size * len(cache.num_blocks_per_group)
    capacity -= cache.block_size * config.scheduler.max_num_seqs  # room for partial blocks
    return key, roofline, planner, capacity


def profile_engine(
    engine,
    grid_kind: GridKind,
    log=print,
    block_layout: BlockLayout = BlockLayout.CONTIGUOUS,
    timing: StepTiming | None = None,
) -> LatencyProfile:
    """Profile an idle engine (no requests in flight; it must allow the grid's batch sizes).
    PIPELINED timing needs an engine that keeps two steps in flight (async scheduling);
    None: `default_step_timing` of the engine's config."""
    if timing is None:
        timing = default_step_timing(engine.config)
    t_start = time.monotonic()
    grid = GRIDS[grid_kind]
    key, roofline, planner, capacity = synthetic_setup(engine, block_layout, timing)
    max_seqs = min(engine.config.scheduler.max_num_seqs, max(grid.decode_batches) + 1)
    points = [
        p
        for p in grid_points(grid, capacity, max_seqs)
        if roofline.step_time_s(planner.composition(list(p))) <= grid.max_step_s
    ]
    log(f"profiling {len(points)} steps on {key.device_name} (KV capacity {capacity} tokens)")
    samples = measure_all(engine.executor, planner, points, grid.repeats, timing)
    pairs = [(m.composition, m.measured_s) for m in samples]
    busiest = [max(range(len(c.groups)), key=lambda g, c=c: roofline.stage_time_s(c.groups[g])) for c, _ in pairs]
    spec = roofline.device
    knee = max(1, round(spec.matmul_flops_per_s * key.shape.dtype_bytes / (2 * spec.memory_bytes_per_s)))
    model = fit_latency_model(pairs, key.layout, knee, busiest, engine_chunk_attention_cost(engine.config))
    errors = sorted(abs(model.step_time_s(c) / t - 1) for c, t in pairs)
    info = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "libraries": library_versions(),
        "grid": grid_kind.value,
        "block_layout": block_layout.value,
        "step_timing": timing.value,
        "elapsed_s": round(time.monotonic() - t_start, 1),
        "fit_error": {
            "median_rel": statistics.median(errors),
            "p95_rel": errors[min(len(errors) - 1, int(0.95 * len(errors)))],
        },
        "samples": [
            {"seqs": [[s.num_tokens, s.start] for s in m.seqs], "measured_s": m.measured_s,
             "predicted_s": model.step_time_s(m.composition)}  # fmt: skip
            for m in samples
        ],
    }
    return LatencyProfile(key, model, info)


def measure_all(
    executor, planner: SyntheticPlanner, points, repeats: int, timing: StepTiming = StepTiming.SERIAL
) -> list[Measurement]:
    """Each point timed by `timing`; the planner must come from `synthetic_setup` with the same timing."""
    timer = measure_pipelined if timing is StepTiming.PIPELINED else measure
    samples = [timer(executor, planner, list(p), repeats) for p in points]
    executor.submit(planner.retire_plan())
    executor.get_result()
    return samples


def measure(executor, planner: SyntheticPlanner, seqs: list[SyntheticSeq], repeats: int) -> Measurement:
    """Median seconds of submit -> result for one synthetic step (after one warm-up run)."""
    times = []
    for i in range(repeats + 1):
        plan = planner.plan(seqs)
        t0 = time.perf_counter()
        executor.submit(plan)
        executor.get_result()
        if i:
            times.append(time.perf_counter() - t0)
    return Measurement(tuple(seqs), planner.composition(seqs), statistics.median(times))


def measure_pipelined(executor, planner: SyntheticPlanner, seqs: list[SyntheticSeq], repeats: int) -> Measurement:
    """Median seconds from one result to the next with two copies of the step in flight (after
    one warm-up run): what a step costs the engine when async scheduling overlaps its host
    work with the previous step's device work."""
    executor.submit(planner.plan(seqs))  # warm-up
    executor.get_result()
    executor.submit(planner.plan(seqs))
    times, last = [], None
    for _ in range(repeats + 1):
        executor.submit(planner.plan(seqs))
        executor.get_result()
        now = time.perf_counter()
        if last is not None:
            times.append(now - last)
        last = now
    executor.get_result()
    return Measurement(tuple(seqs), planner.composition(seqs), statistics.median(times))
