"""Short prefill chunks over long prefixes on one GPU: kernels, calibration, whole-model steps.

    python -m benchmarks.chunk_sweep --out benchmarks/results/chunk_sweep_h200_DATE.json

Parts (each in its own process, so that each starts with the whole GPU):

  calib    attention of one layer (Llama-3-8B heads: 32 / 8, head dim 128, bf16) for a chunk of
           c queries after P keys, on both paths (split-KV Triton, cuDNN), forced; plus a small
           tuning sweep of the Triton kernel. Fits t = fixed(c) + keys * per_key(c) per path
           (the `ChunkCostModel` of latency/kernel_cost.py).
  8b / 1b  whole-model chunk step (as bench/long_context/engine.py's chunk step: forward of c tokens after
           P keys + LM head of the last row) for c in --chunks at the shape's prefixes, eager on
           both paths (cuDNN only where it can run; --auto-path-only: just the path the fitted
           cost model picks), through the worker's piecewise CUDA graphs on that path
           (steps of up to 1024 tokens) and through its mixed-step graphs (up to 512 tokens,
           attention included, when the step fits them): what the engine runs.
           8b also: the mixed step (32 decodes at 1K context + one 128-token chunk after 256K).
  scenario 8b through LLMEngine.step: 32 requests (1K prompts) decoding, then one 256K-token
           prompt; for each fixed chunk in --scenario-chunks: the short requests' TBT p50 /
           p99 / max while the long prompt prefills, and its TTFT (minutes per chunk size).

Floors: FLOPs = 2 (params - embedding) tokens / 800 TFLOP/s + attention FLOPs / 590 TFLOP/s;
bytes = (weight bytes + KV bytes of every key read) / 4.2 TB/s; floor = the larger.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from mnemosyne.bench.long_context.engine import (
    COPY_BPS,
    MIXED_STEP,
    chunk_bytes_floor_s,
    chunk_floor_s,
    mixed_floor_s,
)
from mnemosyne.bench.long_context.run import device_info, write_model_dir

CHUNKS = (16, 32, 64, 128, 256, 512, 2048)
PREFIXES = {"8b": (1 << 17, 1 << 19, 900_000), "1b": (1 << 17, 1 << 20, 3_000_000)}
SHAPE_NAMES = {"8b": "llama3-8b", "1b": "llama3.2-1b"}
CALIB_PREFIXES = (8192, 1 << 16, 1 << 18)


def _log(x: object, log: Path | None) -> None:
    print(x, flush=True)
    if log is not None:
        with log.open("a") as f:
            f.write(json.dumps(x) + "\n")


def fit_max(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(fixed, per_key) of t = max(fixed, keys * per_key) (see latency/kernel_cost.py)
    from (keys, seconds) points: the time at the fewest keys, the time per key at the most."""
    (_, t_lo), (k_hi, t_hi) = min(points), max(points)
    return t_lo, t_hi / k_hi


# ---- calib: one layer's attention --------------------------------------------------------


def _attn_case(c: int, prefix: int, path, cfg=None, reps: int = 5) -> dict:
    from mnemosyne.bench.long_context.kernels import BLOCK, _cache, _tables, time_ms
    from mnemosyne.layers.attention.kernel_backend import KernelBackend
    from mnemosyne.layers.attention.kernel_plan import ChunkKernelConfig
    from mnemosyne.layers.attention.metadata import AttentionMetadata

    h, hkv, d, dtype = 32, 8, 128, torch.bfloat16
    total = prefix + c
    k_cache, v_cache = _cache(total, hkv, d, dtype)
    nb = -(-total // BLOCK)
    meta = AttentionMetadata.build(
        query_lens=[c], q_pos_start=[prefix], kv_start=[0], kv_lens=[total],
        block_tables=_tables(1, nb, False), slot_mapping=[-1] * c, device="cuda", block_runs=[(0, nb)],
    )  # fmt: skip
    q = torch.randn(c, h, d, device="cuda", dtype=dtype)
    backend = KernelBackend(
        h // hkv, d, dtype, torch.device("cuda"), force_path=path, chunk_config=cfg or ChunkKernelConfig()
    )
    meta.backend_plan = backend.plan(meta, hkv, None)
    ms = time_ms(lambda: backend.forward(q, k_cache, v_cache, meta, d**-0.5), iters=reps)
    flops = 4 * h * d * (c * prefix + c * (c + 1) / 2)
    nbytes = 2 * total * hkv * d * dtype.itemsize
    floor_ms = max(flops / 590e12, nbytes / COPY_BPS) * 1e3
    return {
        "chunk": c, "prefix": prefix, "path": path.value, "ms": ms, "floor_ms": floor_ms,
        "ratio_to_floor": ms / floor_ms, "tflops": flops / ms * 1e-9,
        "splits": meta.backend_plan.chunk_splits, "dense": bool(meta.backend_plan.dense),
    }  # fmt: skip


def part_calib(log: Path | None) -> dict:
    from mnemosyne.latency.kernel_cost import ChunkPath
    from mnemosyne.layers.attention.kernel_plan import ChunkKernelConfig

    res: dict = {"tuning": [], "points": [], "fit": {}}
    # Tuning: (block_n, num_warps, num_stages, waves) at c = 32 and 128 after 128K keys.
    configs = [(64, 4, 3, 4), (128, 8, 2, 4), (64, 4, 3, 8)]
    for c in (32, 128):
        for bn, nw, ns, waves in configs:
            cfg = ChunkKernelConfig(block_n=bn, num_warps=nw, num_stages=ns, waves=waves)
            try:
                r = _attn_case(c, 1 << 17, ChunkPath.TRITON_SPLITKV, cfg)
                r["config"] = [bn, nw, ns, waves]
            except Exception as e:  # noqa: BLE001 (report and go on)
                r = {
                    "chunk": c,
                    "config": [bn, nw, ns, waves],
                    "error": f"{type(e).__name__}: {str(e)[:200]}",
                }
            _log(r, log)
            res["tuning"].append(r)
    for path in (ChunkPath.TRITON_SPLITKV, ChunkPath.CUDNN):
        fixed, per_key = [], []
        for c in CHUNKS:
            pts = []
            for prefix in CALIB_PREFIXES:
                r = _attn_case(c, prefix, path)
                _log(r, log)
                res["points"].append(r)
                pts.append((prefix + c, r["ms"] * 1e-3))
            a, b = fit_max(pts)
            fixed.append(a)
            per_key.append(b)
        res["fit"][path.value] = {"chunks": list(CHUNKS), "fixed_s": fixed, "per_key_s": per_key}
        torch.cuda.empty_cache()
    return res


def cost_model_from(fit: dict, source: str):
    from mnemosyne.latency.kernel_cost import ChunkCostModel, PathCost

    def path(f: dict) -> PathCost:
        return PathCost(tuple(f["chunks"]), tuple(f["fixed_s"]), tuple(f["per_key_s"]))

    return ChunkCostModel(path(fit["triton_splitkv"]), path(fit["cudnn"]), 32, 128, source)


# ---- 8b / 1b: whole-model steps ----------------------------------------------------------


def _engine(model_dir: Path, kv_fraction: float):
    from mnemosyne import SamplingParams
    from mnemosyne.engine.args import EngineArgs
    from mnemosyne.engine.llm_engine import LLMEngine

    args = EngineArgs(
        model=str(model_dir), load_format="dummy", dtype="bfloat16", chunk_size=2048,
        max_num_batched_tokens=2048, max_num_seqs=40, kv_cache_memory_fraction=kv_fraction,
    )  # fmt: skip
    engine = LLMEngine.from_args(args)
    engine.add_request(list(range(1000, 4000)), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    while engine.has_unfinished_requests():  # warm-up: Triton JIT, cuDNN plans, the decode graph
        engine.step()
    return engine


def _step_s(
    model, kv_caches, meta, num_tokens: int, positions: torch.Tensor, logits_rows: int, iters: int,
    piecewise=None, mixed=None,
):  # fmt: skip
    """Median seconds of one step: eager, through the worker's piecewise CUDA graphs, or
    through its mixed-step graphs (whole step, attention included: `worker/mixed_graph.py`;
    None when the step does not fit them)."""
    from mnemosyne.bench.long_context.engine import _median_s

    ids = torch.ones(num_tokens, dtype=torch.long, device="cuda")
    if mixed is not None:
        meta.backend_plan = None
        if mixed.try_run(ids, positions, meta) is None:
            return None

    def step() -> int:
        meta.backend_plan = None  # planned once per step, as in the engine
        if mixed is not None:
            hidden = mixed.try_run(ids, positions, meta)
        elif piecewise is not None:
            hidden = piecewise.run(ids, positions, kv_caches, meta)
        else:
            hidden = model(ids, positions, kv_caches, meta)
        return int(model.compute_logits(hidden[-logits_rows:]).argmax(-1)[0])

    return _median_s(step, iters)


def part_model(
    key: str, model_dir: Path, calib: dict | None, kv_fraction: float, log: Path | None,
    chunks: tuple[int, ...] = CHUNKS, forced_paths: bool = True, prefixes: tuple[int, ...] | None = None,
) -> dict:  # fmt: skip
    from mnemosyne.bench.long_context.engine import synthetic_meta
    from mnemosyne.kernels.chunk_tma_attention import fits_page_tiles
    from mnemosyne.latency.kernel_cost import H200_COST, ChunkPath
    from mnemosyne.layers.attention.kernel_backend import KernelBackend
    from mnemosyne.layers.attention.metadata import AttentionMetadata

    engine = _engine(model_dir, kv_fraction)
    cfg, cache = engine.config.model, engine.config.cache
    worker = engine.executor.worker
    model, caches, bs = worker.model, worker.kv_caches, cache.block_size
    backend = next(
        m.backend for m in model.modules() if isinstance(getattr(m, "backend", None), KernelBackend)
    )
    backend.cost_model = cost_model_from(calib["fit"], "this run's calib part") if calib else H200_COST
    capacity = cache.num_blocks_per_group[0] * bs
    res: dict = {"kv_capacity_tokens": capacity, "weight_bytes": cfg.weight_bytes,
                 "kv_bytes_per_token": cfg.kv_bytes_per_token, "steps": []}  # fmt: skip
    res["graph_capture_s"] = worker.capture_s  # start-up: every decode and piecewise graph
    _log({"part": key, "capacity": capacity, "graph_capture_s": worker.capture_s}, log)
    for prefix in prefixes or PREFIXES[key]:
        for c in chunks:
            if prefix + c + bs > capacity or (c == 2048 and prefix > 600_000):
                continue
            meta = synthetic_meta(c, prefix, bs)
            pos = torch.arange(prefix, prefix + c, device="cuda")
            flop_s, byte_s = chunk_floor_s(cfg, c, prefix), chunk_bytes_floor_s(cfg, c, prefix)
            entry = {"prefix": prefix, "chunk": c, "flop_floor_s": flop_s, "bytes_floor_s": byte_s,
                     "floor_s": max(flop_s, byte_s)}  # fmt: skip
            page_tiles = fits_page_tiles(bs, backend.dtype)
            entry["chosen"] = backend.cost_model.cheaper(
                c, prefix + c, cfg.num_heads, cfg.head_dim, page_tiles
            ).value
            iters = 3 if c * prefix > 1 << 29 else 5
            for path in (ChunkPath.TRITON_SPLITKV, ChunkPath.CUDNN) if forced_paths else ():
                if path is ChunkPath.CUDNN and c < 128 and prefix > 600_000:
                    continue  # minutes of cuDNN's unsplit short chunks: known slow (issue 13)
                backend.force_path = path
                try:
                    entry[path.value + "_s"] = _step_s(model, caches, meta, c, pos, 1, iters)
                except Exception as e:  # noqa: BLE001 (report and go on)
                    entry[path.value + "_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            backend.force_path = None
            if not forced_paths:
                entry[entry["chosen"] + "_s"] = _step_s(model, caches, meta, c, pos, 1, iters)
            t = entry.get(entry["chosen"] + "_s")  # eager
            if worker.piecewise is not None and worker.piecewise.can_run(c):
                entry["eager_s"] = t
                t = entry["piecewise_s"] = _step_s(model, caches, meta, c, pos, 1, iters, worker.piecewise)
            if worker.mixed is not None:
                t_mixed = entry["mixed_graph_s"] = _step_s(
                    model, caches, meta, c, pos, 1, iters, mixed=worker.mixed
                )
                t = t_mixed if t_mixed is not None else t
            if t is not None:  # the engine's own path: mixed-step or piecewise graphs where it has them
                entry.update(s=t, ratio_to_floor=t / entry["floor_s"], tokens_per_s=c / t)
            _log(entry, log)
            res["steps"].append(entry)
            torch.cuda.empty_cache()
    if key == "8b":
        # Mixed step: 32 decodes at 1K context + one 128-token chunk after 256K keys.
        n_dec, ctx, c, prefix = MIXED_STEP
        blocks_dec = -(-ctx // bs)
        blocks_long = -(-(prefix + c) // bs)
        tables = [list(range(i * blocks_dec, (i + 1) * blocks_dec)) for i in range(n_dec)]
        tables.append(list(range(n_dec * blocks_dec, n_dec * blocks_dec + blocks_long)))
        meta = AttentionMetadata.build(
            query_lens=[1] * n_dec + [c], q_pos_start=[ctx - 1] * n_dec + [prefix],
            kv_start=[0] * (n_dec + 1), kv_lens=[ctx] * n_dec + [prefix + c], block_tables=tables,
            slot_mapping=[-1] * (n_dec + c), device="cuda",
            block_runs=[(t[0], len(t)) for t in tables],
        )  # fmt: skip
        pos = torch.tensor([ctx - 1] * n_dec + list(range(prefix, prefix + c)), device="cuda")
        tokens = n_dec + c
        flop_s, byte_s = mixed_floor_s(cfg, n_dec, ctx, c, prefix)
        entry = {"mixed": f"{n_dec} decodes at {ctx} + chunk {c} after {prefix}", "flop_floor_s": flop_s,
                 "bytes_floor_s": byte_s, "floor_s": max(flop_s, byte_s)}  # fmt: skip
        for path in (None, ChunkPath.CUDNN):
            backend.force_path = path
            name = "auto" if path is None else path.value
            entry[name + "_s"] = _step_s(model, caches, meta, tokens, pos, n_dec + 1, 5)
        backend.force_path = None
        t = entry["auto_s"]  # eager
        if worker.piecewise is not None and worker.piecewise.can_run(tokens):
            t = entry["piecewise_s"] = _step_s(
                model, caches, meta, tokens, pos, n_dec + 1, 5, worker.piecewise
            )
        if worker.mixed is not None:
            t_mixed = entry["mixed_graph_s"] = _step_s(
                model, caches, meta, tokens, pos, n_dec + 1, 5, mixed=worker.mixed
            )
            t = t_mixed if t_mixed is not None else t
        entry["ratio_to_floor"] = t / entry["floor_s"]
        _log(entry, log)
        res["mixed"] = entry
    engine.shutdown()
    return res


# ---- scenario: a long prompt among decodes, through the engine ---------------------------


def part_scenario(
    model_dir: Path,
    chunks: list[int],
    kv_fraction: float,
    log: Path | None,
    num_short: int = 32,
    short_len: int = 1024,
    long_len: int = 1 << 18,
    dtype: str = "bfloat16",
) -> dict:
    import statistics

    from mnemosyne import SamplingParams
    from mnemosyne.bench.long_context.engine import random_prompt
    from mnemosyne.engine.args import EngineArgs
    from mnemosyne.engine.llm_engine import LLMEngine

    res: dict = {"num_short": num_short, "short_len": short_len, "long_len": long_len, "runs": []}
    for chunk in chunks:
        args = EngineArgs(
            model=str(model_dir), load_format="dummy", dtype=dtype, chunk_size=chunk,
            max_num_batched_tokens=chunk + num_short, max_num_seqs=num_short + 1,
            kv_cache_memory_fraction=kv_fraction, enable_prefix_caching=False,  # the same prompts per chunk size
        )  # fmt: skip
        engine = LLMEngine.from_args(args)
        vocab = engine.config.model.vocab_size
        # Long enough to keep decoding through the whole prefill (stopped once it ends).
        params = SamplingParams(temperature=0, max_tokens=2 * long_len // chunk + short_len, ignore_eos=True)
        for i in range(num_short):
            engine.add_request(
                random_prompt(short_len, seed=100 + i, max_id=vocab), params, request_id=f"s{i}"
            )
        times: dict[str, list[float]] = {}
        while sum(len(v) for v in times.values()) < 4 * num_short:  # all decoding, graphs captured
            for o in engine.step():
                times[o.request_id] = list(o.timing.token_times)
        t_arrival = time.monotonic()  # the engine's clock
        engine.add_request(random_prompt(long_len, seed=7, max_id=vocab), SamplingParams(temperature=0, max_tokens=1),
                           request_id="long")  # fmt: skip
        ttft = None
        while ttft is None:
            for o in engine.step():
                if o.request_id == "long" and o.timing.first_token_time is not None:
                    ttft = o.timing.first_token_time - t_arrival
                else:
                    times[o.request_id] = list(o.timing.token_times)
        gaps = sorted(
            b - a for ts in times.values() for a, b in zip(ts, ts[1:], strict=False) if a >= t_arrival
        )
        entry = {"chunk": chunk, "long_ttft_s": ttft, "num_gaps": len(gaps),
                 "tbt_p50_s": statistics.median(gaps) if gaps else None,
                 "tbt_p99_s": gaps[int(0.99 * (len(gaps) - 1))] if gaps else None,
                 "tbt_max_s": gaps[-1] if gaps else None}  # fmt: skip
        _log(entry, log)
        res["runs"].append(entry)
        engine.shutdown()
        del engine
        torch.cuda.empty_cache()
    return res


# ---- driver --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="calib,8b,1b")
    ap.add_argument("--part", choices=["calib", "8b", "1b", "scenario"], help=argparse.SUPPRESS)
    ap.add_argument("--scenario-chunks", default="64,128,512,2048")
    ap.add_argument("--chunks", default=",".join(map(str, CHUNKS)), help="chunk sizes of the 8b/1b parts")
    ap.add_argument("--prefixes", default="", help="prefixes of the 8b/1b parts (default: the shape's)")
    ap.add_argument("--auto-path-only", action="store_true",
                    help="8b/1b parts: time only the path the cost model picks (eager and piecewise)")  # fmt: skip
    ap.add_argument("--part-out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--calib", type=Path, default=None, help="a calib part's JSON (for the model parts)")
    ap.add_argument("--kv-fraction", type=float, default=0.95)
    ap.add_argument("--part-timeout", type=float, default=300.0)
    ap.add_argument("--timeouts", default="", help="per-part overrides, e.g. calib=100,8b=180")
    ap.add_argument("--log", type=Path, default=None, help="JSON lines of every measurement, as it comes")
    ap.add_argument("--out", type=Path, required=True)
    ns = ap.parse_args(argv)
    if ns.part:
        calib = json.loads(ns.calib.read_text()) if ns.calib and ns.calib.exists() else None
        with tempfile.TemporaryDirectory() as tmp:
            if ns.part == "calib":
                res = part_calib(ns.log)
            elif ns.part == "scenario":
                model_dir = write_model_dir("llama3-8b", Path(tmp))
                chunks = [int(c) for c in ns.scenario_chunks.split(",")]
                res = part_scenario(model_dir, chunks, ns.kv_fraction, ns.log)
            else:
                max_pos = 1 << 22 if ns.part == "1b" else 1 << 21
                model_dir = write_model_dir(SHAPE_NAMES[ns.part], Path(tmp), max_pos)
                chunks = tuple(int(c) for c in ns.chunks.split(","))
                prefixes = tuple(int(p) for p in ns.prefixes.split(",") if p) or None
                res = part_model(
                    ns.part, model_dir, calib, ns.kv_fraction, ns.log, chunks, not ns.auto_path_only, prefixes
                )
        ns.part_out.write_text(json.dumps(res, indent=1))
        return 0
    result: dict = {
        "benchmark": "chunk_sweep", "date": datetime.date.today().isoformat(), "device": device_info(),
        "command": "python -m benchmarks.chunk_sweep " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "floors": {"copy_TBps": 4.2, "matmul_TFLOPs": 800, "attention_TFLOPs": 590},
    }  # fmt: skip
    calib_path = ns.calib or ns.out.with_suffix(".calib.json")
    for part in ns.parts.split(","):
        part_out = ns.out.with_suffix(f".{part}.json")
        cmd = [sys.executable, "-m", "benchmarks.chunk_sweep", "--part", part, "--part-out", str(part_out),
               "--calib", str(calib_path), "--kv-fraction", str(ns.kv_fraction), "--out", str(ns.out),
               "--scenario-chunks", ns.scenario_chunks, "--chunks", ns.chunks, "--prefixes", ns.prefixes]  # fmt: skip
        if ns.auto_path_only:
            cmd.append("--auto-path-only")
        if ns.log:
            cmd += ["--log", str(ns.log)]
        try:
            timeouts = dict(kv.split("=") for kv in ns.timeouts.split(",") if kv)
            proc = subprocess.run(cmd, timeout=float(timeouts.get(part, ns.part_timeout)))
            result[part] = (
                json.loads(part_out.read_text()) if proc.returncode == 0 else {"rc": proc.returncode}
            )
        except (subprocess.TimeoutExpired, OSError, ValueError) as e:
            result[part] = {"error": f"{type(e).__name__}: {e}"}
            traceback.print_exc()
        if part == "calib" and "fit" in result[part]:
            calib_path.write_text(json.dumps(result[part]))
        ns.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
