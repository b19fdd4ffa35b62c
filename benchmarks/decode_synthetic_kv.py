"""Decode TBT of one request at 1M-10M tokens of context, the KV synthetic, on 1-8 GPUs.

    python -m benchmarks.decode_synthetic_kv --out benchmarks/results/decode_synthetic_kv_h200_DATE.json
    python -m benchmarks.decode_synthetic_kv --kvp 2 --out ...   # 2 GPUs: 2M, 4M, 7M (3.5M per GPU)
    python -m benchmarks.decode_synthetic_kv --kvp 2 --contexts 8e6 --out ...   # 4M per GPU

Random Llama-3.2-1B shape (llama3 rope, positions declared to 16M), bf16, dummy weights,
CUDA graphs on. Any layout: --tp, --spp, --kvp (default 1 each); one device runs in this
process, more run one worker process per device (NCCL on CUDA, gloo on CPU). Per context
L, through `LLMEngine.step` (mnemosyne/bench/long_context/synthetic_kv.py says what is
real and what is not)::

    add the request (L prompt tokens)   the KV manager allocates its blocks, chunk by chunk,
                                        at most T of them on each KVP group (below)
    step until its prefill is "done"    each chunk computes only its last token
    fill its blocks with N(0, 1) K/V    on every rank, the blocks its KVP group holds, every
                                        layer (the KV IS SYNTHETIC: decode cost does not
                                        depend on the values; the tokens are meaningless);
                                        every rank reports its blocks and the mean x^2 it
                                        reads back (~1), checked against the KV manager
    warm-up decodes, then --steps decode steps alone            -> "alone"
    add --num-short requests of --short-prompt tokens (a real prefill), warm-up,
    then --steps steps of all of them decoding together         -> "with_short"
    abort all (the KV is freed for the next context)

Default contexts: 1M, 2M and 3.5M tokens times kvp. KVP: a request fills T tokens of one
group before it onboards the next (docs/architecture.md, "KV-cache parallelism"); T =
--max-tokens-per-kvp-group, by default ceil((largest context + decoded tokens) / kvp)
rounded up to a block, which spreads the largest context evenly (8M tokens at kvp=2: 4M
per group); a smaller context then spans fewer groups.

Per phase: TBT p50/p99 (gaps between the long request's token times, as the engine
stamps them) and the floor per step, per GPU:

    floor = (weight bytes + max over KVP groups g of the KV bytes g holds) / tp / 4.2 TB/s

Every group reads its share of the KV and all the weights in the same step (the slowest
group sets the pace); tp ranks split both (the KV heads divide by tp in the shapes here);
spp stages run one after the other for one token, so spp does not divide it. TP
all-reduces, stage sends and the KVP merge's all-gather are not in the floor.

One device (the in-process executor) also gives the GPU time of the decode forward (CUDA
events around the worker's `DecodeGraphs.run`: input copies + graph replay; the LM head
and sampling are outside) and host time = TBT - forward. With worker processes the
forward runs in another process: those fields are absent ("forward_gpu_timing" says so),
not estimated. With async scheduling (spp == 1, one device or worker processes; the
engine's default, --no-async-scheduling to compare) the host's work for step n+1 overlaps
step n on the GPUs, so TBT approaches the GPU time (forward, LM head, sampling; with
workers also the decode-ahead token all-reduce) instead of forward + host, and "host" is
the host time left unhidden. (Its first decode after the prefill is launched before the
synthetic fill, so it reads unfilled blocks: a warm-up step, never measured.) With spp > 1
steps stay synchronous.

The KV budget per GPU is exactly what the run needs (--kv-cache-gb overrides, also per
GPU): T tokens plus the short requests. 3.5M tokens of the 1B shape are 3.5e6 x 32 KiB =
107 GiB of KV + 2.3 GiB of weights on a 139 GiB H200; about 4.2M tokens fit per GPU.
CPU smoke (tests): --shape tiny-llama --device cpu --contexts 200,300 --steps 4 ... [--kvp 2]
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import torch

from mnemosyne.bench.long_context.engine import COPY_BPS, decode_floor_s, random_prompt
from mnemosyne.bench.long_context.run import (
    LONG_MAX_POSITIONS,
    SHAPES,
    device_info,
    write_model_dir,
    write_result,
)
from mnemosyne.bench.long_context.synthetic_kv import SyntheticPrefillExecutor, check_fill, kv_tokens_by_group
from mnemosyne.config import ModelConfig, parse_dtype
from mnemosyne.engine.args import (
    DEFAULT_BLOCK_SIZE,
    EngineArgs,
    kv_bytes_per_token_per_device,
    weight_bytes_per_device,
)
from mnemosyne.engine.llm_engine import LLMEngine
from mnemosyne.errors import ConfigError
from mnemosyne.executor.uniproc import UniProcExecutor
from mnemosyne.sampling_params import SamplingParams

DEFAULT_CONTEXTS_PER_GROUP = (1_000_000, 2_000_000, 3_500_000)


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(float(x)) for x in s.split(",")]  # noqa: E731  (accepts 3.5e6)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3.2-1b")
    ap.add_argument(
        "--contexts", type=ints, default=None, help="default: 1M, 2M, 3.5M tokens per KVP group (times --kvp)"
    )
    ap.add_argument("--steps", type=int, default=64, help="measured decode steps per phase")
    ap.add_argument("--warmup", type=int, default=8, help="decode steps before each measurement")
    ap.add_argument("--num-short", type=int, default=16, help="short requests decoding alongside (0: none)")
    ap.add_argument("--short-prompt", type=int, default=1024)
    ap.add_argument("--prefill-chunk", type=int, default=1 << 18, help="chunk of the (skipped) long prefill")
    ap.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE)
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per stage")
    ap.add_argument("--spp", type=int, default=1, help="pipeline stages per KVP group")
    ap.add_argument("--kvp", type=int, default=1, help="KV-cache-parallel groups")
    ap.add_argument(
        "--max-tokens-per-kvp-group", type=lambda s: int(float(s)), default=None,
        help="max_tokens_per_kvp_group (kvp > 1); default: the largest context spread evenly",
    )  # fmt: skip
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="auto: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument(
        "--kv-cache-gb", type=float, default=None, help="per GPU; default: what the largest context needs"
    )
    ap.add_argument(
        "--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
        help="schedule step n+1 while the GPU runs step n (the engine's default); "
        "--no-async-scheduling: synchronous steps, to compare",
    )  # fmt: skip
    ap.add_argument("--out", type=Path, default=None)
    ns = ap.parse_args(argv)
    if ns.contexts is None:
        ns.contexts = [n * ns.kvp for n in DEFAULT_CONTEXTS_PER_GROUP]
    return ns


def _long_max_tokens(ns: argparse.Namespace) -> int:
    return 4 * (ns.warmup + ns.steps) + 16  # never reached: the requests are aborted


def tokens_per_group(ns: argparse.Namespace) -> int:
    """T: the most tokens of one request on one KVP group (the largest context, with its
    decoded tokens, spread evenly over the groups, rounded up to a block)."""
    if ns.max_tokens_per_kvp_group is not None:
        return ns.max_tokens_per_kvp_group
    per_group = -(-(max(ns.contexts) + _long_max_tokens(ns)) // ns.kvp)
    return -(-per_group // ns.block_size) * ns.block_size


def kv_tokens_needed(ns: argparse.Namespace) -> int:
    """KV slots one GPU needs: the long request's share T and every short companion (any of
    them may land on the same group), with a block of slack each."""
    out = _long_max_tokens(ns)
    per_req = ns.block_size
    return tokens_per_group(ns) + per_req + ns.num_short * (ns.short_prompt + out + per_req)


def make_engine(model_dir: Path, ns: argparse.Namespace) -> LLMEngine:
    """The engine, its executor wrapped for synthetic prefills. One device: the KV, weights
    and a 4 GiB margin are checked against the free memory first; worker processes check
    nothing here (this process would take a CUDA context on each of their GPUs): a KV cache
    that does not fit fails in a worker, which reports the out-of-memory error."""
    device = EngineArgs(device=ns.device).resolve_device()
    dtype = EngineArgs(dtype=ns.dtype).resolve_dtype(device)
    cfg = ModelConfig.from_pretrained(model_dir, dtype)
    base = EngineArgs(tp=ns.tp, spp=ns.spp, kvp=ns.kvp)
    parallel = base.parallel_config()
    kv_gb = (
        ns.kv_cache_gb or kv_tokens_needed(ns) * kv_bytes_per_token_per_device(cfg, parallel) / 2**30 + 0.01
    )
    if device.startswith("cuda") and parallel.world_size == 1:
        free, _ = torch.cuda.mem_get_info()
        weights = weight_bytes_per_device(cfg, parallel)
        need = kv_gb * 2**30 + weights + 4 * 2**30  # 4 GiB: activations, graphs, context
        if need > free:
            raise ConfigError(
                f"{kv_gb:.1f} GiB of KV + {weights / 2**30:.1f} GiB of weights + 4 GiB do not fit "
                f"the {free / 2**30:.1f} GiB free: lower --contexts"
            )
    args = EngineArgs(
        model=str(model_dir), load_format="dummy", dtype=str(dtype).removeprefix("torch."), device=device,
        tp=ns.tp, spp=ns.spp, kvp=ns.kvp, max_tokens_per_kvp_group=tokens_per_group(ns) if ns.kvp > 1 else None,
        block_size=ns.block_size, chunk_size=ns.prefill_chunk, max_num_batched_tokens=ns.prefill_chunk,
        max_num_seqs=max(8, ns.num_short + 1), kv_cache_memory_gb=kv_gb, enable_prefix_caching=False,
        chunk_policy="fixed", scheduling_policy="fcfs", async_scheduling=ns.async_scheduling,
    )  # fmt: skip
    engine = LLMEngine.from_args(args)
    engine.executor = SyntheticPrefillExecutor(engine.executor)
    return engine


def in_process_graphs(engine: LLMEngine):  # -> DecodeGraphs | None
    """The in-process worker's decode graphs (None with worker processes or without graphs)."""
    inner = engine.executor.inner  # type: ignore[attr-defined]
    return inner.worker.graphs if isinstance(inner, UniProcExecutor) else None


def step_floor_s(cfg: ModelConfig, held: list[int], tp: int) -> float:
    """(weight bytes + the busiest group's KV bytes) / tp / 4.2 TB/s (the module docstring)."""
    return decode_floor_s(cfg, max(held)) / tp


class ForwardTimer:
    """CUDA events around the worker's `DecodeGraphs.run` (None on CPU / without graphs)."""

    def __init__(self, graphs) -> None:  # graphs: DecodeGraphs | None
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.enabled = graphs is not None
        if graphs is None:
            return
        run = graphs.run

        def timed_run(*args, **kwargs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = run(*args, **kwargs)
            end.record()
            self.events.append((start, end))
            return out

        graphs.run = timed_run

    def take_s(self) -> list[float]:
        if self.events:
            torch.cuda.synchronize()
        times = [s.elapsed_time(e) / 1e3 for s, e in self.events]
        self.events = []
        return times


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def _gaps(token_times: list[float], n: int) -> list[float]:
    """The last n gaps between consecutive token times."""
    t = token_times[-n - 1 :]
    return [b - a for a, b in zip(t, t[1:], strict=False)]


def decode_phase(
    engine: LLMEngine, timer: ForwardTimer, long_id: str, short_id: str | None, ns: argparse.Namespace
) -> dict:
    """Warm-up, then --steps steps; every running request must be decoding."""
    for _ in range(ns.warmup):
        engine.step()
    timer.take_s()
    times: dict[str, list[float]] = {}
    walls: list[float] = []
    for _ in range(ns.steps):
        t0 = time.perf_counter()
        outs = engine.step()
        walls.append(time.perf_counter() - t0)
        times |= {o.request_id: o.timing.token_times for o in outs}
        if any(o.finished for o in outs):
            raise RuntimeError("a request finished during the measurement: raise max_tokens")
    gaps = _gaps(times[long_id], ns.steps)
    fwd = timer.take_s()
    res = {
        "num_decodes": engine.scheduler.num_running,
        "tbt_p50_s": statistics.median(gaps), "tbt_p99_s": _pct(gaps, 0.99), "tbt_max_s": max(gaps),
        "step_wall_p50_s": statistics.median(walls),
    }  # fmt: skip
    if timer.enabled:
        res["cuda_graph_steps"] = len(fwd)
    if short_id is not None:
        short_gaps = _gaps(times[short_id], ns.steps)
        res |= {"short_tbt_p50_s": statistics.median(short_gaps), "short_tbt_p99_s": _pct(short_gaps, 0.99)}
    if fwd:
        res["forward_gpu_p50_s"] = statistics.median(fwd)
        res["host_p50_s"] = res["tbt_p50_s"] - res["forward_gpu_p50_s"]
    return res


def measure_context(engine: LLMEngine, timer: ForwardTimer, ctx: int, ns: argparse.Namespace) -> dict:
    ex: SyntheticPrefillExecutor = engine.executor  # type: ignore[assignment]
    cfg = engine.config.model
    long_id = f"long-{ctx}"
    ex.synthetic_ids.add(long_id)
    params = SamplingParams(temperature=0, max_tokens=_long_max_tokens(ns), ignore_eos=True)
    t0 = time.perf_counter()
    skipped_before = ex.num_skipped_tokens
    engine.add_request([1] * ctx, params, request_id=long_id)
    req = engine.scheduler.get_request(long_id)
    num_prefill_steps = 0
    while req.is_prefill or req.num_output_tokens == 0:
        engine.step()
        num_prefill_steps += 1
    t_prefill = time.perf_counter() - t0
    num_blocks = sum(len(piece.block_ids) for piece in engine.kv_manager.pieces(long_id))
    t0 = time.perf_counter()
    filled = ex.fill_synthetic_kv(long_id, seed=ctx)  # returns once every rank is done
    fill_s = time.perf_counter() - t0
    check_fill(engine.kv_manager, long_id, filled)
    held = kv_tokens_by_group(engine.kv_manager, {long_id: ctx})
    entry = {
        "ctx": ctx, "kv_synthetic": True, "num_blocks": num_blocks, "kv_tokens_by_group": held,
        "synthetic_prefill_steps": num_prefill_steps, "synthetic_prefill_s": t_prefill,
        "prefill_tokens_skipped": ex.num_skipped_tokens - skipped_before,
        "fill_s": fill_s, "fill_bytes": sum(f.num_bytes for f in filled),
        "fill_by_rank": [msgspec.structs.asdict(f) for f in filled],
        "floor_s": step_floor_s(cfg, held, ns.tp), "kv_bytes_read_max_group": max(held) * cfg.kv_bytes_per_token,
    }  # fmt: skip
    entry["alone"] = decode_phase(engine, timer, long_id, None, ns)
    entry["alone"]["ratio_to_floor"] = entry["alone"]["tbt_p50_s"] / entry["floor_s"]
    print(entry, flush=True)
    short_ids = []
    if ns.num_short:
        vocab = cfg.vocab_size
        for i in range(ns.num_short):
            prompt = random_prompt(ns.short_prompt, seed=i, max_id=vocab)
            short_ids.append(engine.add_request(prompt, params, request_id=f"short-{ctx}-{i}"))
        while any(engine.scheduler.get_request(r).is_prefill for r in short_ids):
            engine.step()
        with_short = decode_phase(engine, timer, long_id, short_ids[0], ns)
        short_ctx = ns.short_prompt + ns.warmup
        held = kv_tokens_by_group(engine.kv_manager, {long_id: ctx} | dict.fromkeys(short_ids, short_ctx))
        floor = step_floor_s(cfg, held, ns.tp)
        with_short["kv_tokens_by_group"] = held
        with_short["floor_s"] = floor
        with_short["ratio_to_floor"] = with_short["tbt_p50_s"] / floor
        entry["with_short"] = with_short
        print({"ctx": ctx, "with_short": with_short}, flush=True)
    for rid in (long_id, *short_ids):
        engine.abort(rid)
    ex.synthetic_ids.discard(long_id)
    engine.kv_manager.check_integrity()
    return entry


def run(ns: argparse.Namespace, argv: list[str]) -> dict:
    device = device_info()  # before any worker holds its GPU's memory
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model_dir(ns.shape, Path(tmp), LONG_MAX_POSITIONS)
        t0 = time.perf_counter()
        engine = make_engine(model_dir, ns)
        startup_s = time.perf_counter() - t0
        try:
            return measure_all(engine, ns, argv, device, startup_s)
        finally:
            engine.shutdown()


def measure_all(
    engine: LLMEngine, ns: argparse.Namespace, argv: list[str], device: dict, startup_s: float
) -> dict:
    """The benchmark's result: every context of --contexts on the engine `make_engine` built."""
    cfg, cache, parallel = engine.config.model, engine.config.cache, engine.config.parallel
    graphs = in_process_graphs(engine)
    timer = ForwardTimer(graphs)
    in_process = parallel.world_size == 1
    result = {
        "benchmark": "decode_synthetic_kv",
        "kv": "SYNTHETIC: the long prefix's K/V are N(0,1) values written into the blocks the "
        "KV manager allocated; its prefill compute was skipped (decode cost does not depend "
        "on the values). Decode steps run through LLMEngine.step (with CUDA graphs on GPU).",
        "command": "python -m benchmarks.decode_synthetic_kv " + shlex.join(argv),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": device,
        "shape": ns.shape, "config": SHAPES[ns.shape], "dtype": str(cfg.dtype),
        "layout": {"tp": parallel.tp, "spp": parallel.spp, "kvp": parallel.kvp,
                   "world_size": parallel.world_size},
        "executor": "in-process" if in_process else "worker processes",
        "weight_bytes": cfg.weight_bytes, "kv_bytes_per_token": cfg.kv_bytes_per_token,
        "kv_capacity_tokens_per_group": cache.num_blocks_per_group[0] * cache.block_size,
        "max_tokens_per_kvp_group": cache.max_tokens_per_kvp_group,
        "max_model_len": engine.config.scheduler.max_model_len,
        "cuda_graphs": graphs is not None if in_process
        else engine.config.device.startswith("cuda") and not engine.config.enforce_eager,
        "forward_gpu_timing": "CUDA events around the worker's DecodeGraphs.run"
        if timer.enabled else "unavailable: " + ("the workers run in other processes"
                                                 if not in_process else "no decode graphs"),
        "async_scheduling": engine.config.scheduler.async_scheduling,
        "engine_startup_s": startup_s,
        "floors": {"copy_TBps": COPY_BPS / 1e12,
                   "per_step": "(weight_bytes + max over KVP groups of the KV bytes it holds) / tp / copy"},
        "steps": ns.steps, "warmup": ns.warmup, "num_short": ns.num_short,
        "short_prompt": ns.short_prompt,
        "results": [],
    }  # fmt: skip
    for ctx in sorted(ns.contexts):
        result["results"].append(measure_context(engine, timer, ctx, ns))
    return result


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = parse_args(argv)
    if ns.dtype != "auto":
        parse_dtype(ns.dtype)  # a clear error before the engine starts
    write_result(run(ns, argv), ns.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
