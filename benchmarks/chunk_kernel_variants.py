"""One layer's chunk attention on one GPU: the split-KV kernel against its page-aligned TMA variant.

    python -m benchmarks.chunk_kernel_variants --out benchmarks/results/chunk_kernel_variants_h200_DATE.json

The attention heads of --shape (default Llama-3-8B: 32 query / 8 KV, head dim 128;
llama3.2-1b: head dim 64), bf16; a chunk of c queries after P keys of one sequence (blocks ascending as the engine lays out a long request; --shuffled: 128-token runs
of blocks in a random order), c in --chunks, P in --prefixes. Kernels and options:

  splitkv  kernels/chunk_splitkv_attention.py, its defaults, at block_size 16, 64 and 128
  tma      kernels/chunk_tma_attention.py over block_n x block_m x num_warps x num_stages
           (block_size 128; block_size 64 and pointer loads for a few; multi-page steps:
           block_n 128 = two pages at block_size 64; "defaults": block_size 64 with every
           option None, i.e. the kernel's own choices and the engine's tiles,
           recorded as resolved_* in the rows); at each point the best
           TMA config also with the split count aimed at 2 and 4 programs per SM (`waves`)
           (warp specialization was measured here on 2026-11-29, no gain, and then removed
           from the kernel); --wide-tiles: instead, 256-row query tiles of 8 warps beside
           the defaults

Each config is one wrapper call (split phase + merge) with the engine's split count
(`choose_chunk_splits` with the kernel's waves and cap, as `KernelBackend.chunk_splits`;
before the seventeenth session the tma rows took the split-KV kernel's: 4 waves, <= 128,
and the best config was tried at 2 and 8), timed with CUDA events over --iters launches
after two warm-ups.
Effective TFLOP/s = 4 h d (c P + c (c + 1) / 2) / time; floor = max(FLOPs / 590 TFLOP/s,
K/V bytes / 4.2 TB/s). Per compiled kernel: whether its PTX holds wgmma and TMA
(cp.async.bulk.tensor), whether its TTGIR was warp-specialized, registers, spills, shared
memory. Every output is checked against the split-KV kernel's at block_size 16 (max |diff|).
Failures are recorded per config and the sweep goes on; the sweep runs in a child process
that is resumed from its rows if it dies (a compiler crash loses only the config that
crashed), under a wall-clock budget (--budget-s, default 260).

--smoke: a seconds-long run on CPU under TRITON_INTERPRET=1 (tiny sizes, one config each),
to check the script itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Heads:
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, shape: str) -> Heads:
        from mnemosyne.bench.long_context.run import SHAPES

        cfg = SHAPES[shape]
        return cls(cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"])


ATTN_FLOPS = 590e12
COPY_BPS = 4.2e12
CONFIG_FIELDS = (
    "kernel",
    "page",
    "block_n",
    "block_m",
    "num_warps",
    "num_stages",
    "use_tma",
    "waves",
)
# The kernel's own launch choices at the engine's block size: every option None.
DEFAULTS_CONFIG = dict(kernel="tma", page=64, block_n=None, block_m=None, num_warps=None, num_stages=None,
                       use_tma=None)  # fmt: skip
RESTART_RC = 3  # the sweep process exits with it after a sticky CUDA error; the driver resumes it
MAX_RESTARTS = 3


def config_key(row: dict) -> str:
    """The kernel options of a config (or of a result row holding one)."""
    return json.dumps({k: row[k] for k in CONFIG_FIELDS if k in row}, sort_keys=True)


def variant_configs(smoke: bool) -> list[dict]:
    """Option sets of the tma kernel (+ a few page-64, multi-page and pointer-load ones)."""
    if smoke:
        return [
            dict(kernel="tma", page=16, block_n=16, block_m=32, num_warps=4, num_stages=1, use_tma=True),
            dict(kernel="tma", page=16, block_n=32, block_m=32, num_warps=4, num_stages=1, use_tma=True),
            DEFAULTS_CONFIG,
        ]  # fmt: skip
    grid = itertools.product((64, 128), (128, 64), (8, 4), (3, 2, 4))
    out = [
        dict(kernel="tma", page=128, block_n=bn, block_m=bm, num_warps=nw, num_stages=ns,
             use_tma=True)
        for bn, bm, nw, ns in grid
        if not (bm == 64 and nw == 8)  # two warpgroups on 64 rows: no wgmma tile (Triton's Hopper filter)
    ]  # fmt: skip
    for bm, nw in ((128, 8), (64, 4)):
        out.append(dict(kernel="tma", page=64, block_n=64, block_m=bm, num_warps=nw, num_stages=3,
                        use_tma=True))  # fmt: skip
        out.append(dict(kernel="tma", page=128, block_n=64, block_m=bm, num_warps=nw, num_stages=3,
                        use_tma=False))  # fmt: skip
    out.append(dict(kernel="tma", page=128, block_n=128, block_m=128, num_warps=8, num_stages=2,
                    use_tma=False))  # fmt: skip
    # Multi-page steps: 128 keys over two 64-key pages (one TMA box and score tile per page).
    for bm, nw, ns in ((64, 4, 4), (64, 4, 3), (128, 4, 3), (128, 8, 3)):
        out.append(dict(kernel="tma", page=64, block_n=128, block_m=bm, num_warps=nw, num_stages=ns,
                        use_tma=True))  # fmt: skip
    out.append(dict(kernel="tma", page=64, block_n=128, block_m=64, num_warps=4, num_stages=4, use_tma=False))
    out.append(DEFAULTS_CONFIG)
    return out


def wide_tile_configs(smoke: bool) -> list[dict]:
    """Query tiles of 256 rows (--wide-tiles: 64 tokens at GQA 4) over two warpgroups of 8
    warps, which share each K/V tile (a 128-row tile reads the prefix once per tile), beside
    the engine's defaults."""
    if smoke:
        return [dict(kernel="tma", page=64, block_n=64, block_m=256, num_warps=8, num_stages=2, use_tma=True),
                DEFAULTS_CONFIG]  # fmt: skip
    out = [
        dict(kernel="tma", page=64, block_n=bn, block_m=256, num_warps=8, num_stages=ns, use_tma=True)
        for bn, ns in itertools.product((64, 128), (2, 3))
    ]
    return [*out, DEFAULTS_CONFIG]


def baseline_configs(smoke: bool) -> list[dict]:
    pages = (16,) if smoke else (16, 64, 128)
    return [dict(kernel="splitkv", page=p) for p in pages]


def compiled_info(jit_fn, before: set) -> tuple[dict | None, set]:
    """Facts about the kernels `jit_fn` compiled since `before` (Triton 3.6 internals: None
    when they are not there, e.g. under the interpreter)."""
    try:
        entries = {}
        for caches in jit_fn.device_caches.values():
            entries.update({id(k): k for k in caches[0].values()})
    except Exception:  # noqa: BLE001 (internals moved: report nothing)
        return None, before
    new = [k for i, k in entries.items() if i not in before]
    if not new:
        return None, set(entries)
    k = new[-1]
    ptx, ttgir = k.asm.get("ptx", ""), k.asm.get("ttgir", "")
    info = {
        "wgmma": "wgmma" in ptx, "tma": "cp.async.bulk.tensor" in ptx, "mma_sync": "mma.sync" in ptx,
        "warp_specialized": "ttg.warp_specialize" in ttgir, "setmaxnreg": "setmaxnreg" in ptx, "n_regs": getattr(k, "n_regs", None),
        "n_spills": getattr(k, "n_spills", None), "shared_bytes": getattr(k.metadata, "shared", None),
        "num_warps": getattr(k.metadata, "num_warps", None),
    }  # fmt: skip
    return info, set(entries)


class Point:
    """Inputs of one (c, P) case, shared by every kernel config: one flat K/V buffer viewed
    at each block size, ascending (or shuffled) block tables."""

    def __init__(
        self, k_flat, v_flat, c: int, prefix: int, shuffled: bool, device: str, heads: Heads
    ) -> None:
        import torch

        self.c, self.prefix, self.device, self.shuffled = c, prefix, device, shuffled
        self.k_flat, self.v_flat, self.heads = k_flat, v_flat, heads
        self.q = torch.randn(c, heads.num_heads, heads.head_dim, device=device, dtype=k_flat.dtype)
        self.qsl = torch.tensor([0, c], dtype=torch.int32, device=device)
        self.q_pos = torch.tensor([prefix], dtype=torch.int64, device=device)
        self.kv_start = torch.zeros(1, dtype=torch.int64, device=device)
        self.kv_lens = torch.tensor([prefix + c], dtype=torch.int32, device=device)
        self.merge_rows = torch.arange(c, dtype=torch.int32, device=device)
        self.ref = None

    def cache(self, page: int):
        """K/V viewed as [blocks, page, num_kv_heads, head_dim] and a block table. Shuffled: 128-token runs in a
        random order, the same at every page size (page divides 128), so every config reads
        the same keys in the same logical order and the outputs stay comparable."""
        import torch

        runs = -(-(self.prefix + self.c) // 128)
        per_run = 128 // page
        hkv, d = self.heads.num_kv_heads, self.heads.head_dim
        k = self.k_flat[: runs * 128].view(runs * per_run, page, hkv, d)
        v = self.v_flat[: runs * 128].view(runs * per_run, page, hkv, d)
        gen = torch.Generator().manual_seed(0)
        order = torch.randperm(runs, generator=gen) if self.shuffled else torch.arange(runs)
        table = (order[:, None] * per_run + torch.arange(per_run)).flatten()
        return k, v, table.to(torch.int32)[None].to(self.device)

    def floor(self) -> tuple[float, float]:
        h, hkv, d = self.heads.num_heads, self.heads.num_kv_heads, self.heads.head_dim
        flops = 4 * h * d * (self.c * self.prefix + self.c * (self.c + 1) / 2)
        nbytes = 2 * (self.prefix + self.c) * hkv * d * self.k_flat.element_size()
        return flops, max(flops / ATTN_FLOPS, nbytes / COPY_BPS)


def run_config(pt: Point, cfg: dict, num_sms: int, iters: int) -> dict:
    import torch

    from mnemosyne.bench.long_context.kernels import time_ms
    from mnemosyne.kernels.chunk_splitkv_attention import (
        DEFAULT_WAVES,
        MAX_SPLITS,
        choose_chunk_splits,
        chunk_splitkv_attention,
    )
    from mnemosyne.kernels.chunk_tma_attention import (
        PAGE_TILES_MAX_SPLITS,
        PAGE_TILES_WAVES,
        chunk_tma_attention,
    )
    from mnemosyne.kernels.chunk_tma_launch import default_tma_block_n, tma_tile_launch
    from mnemosyne.kernels.paged_prefill import default_block_q, plan_query_tiles

    h, hkv, d = pt.heads.num_heads, pt.heads.num_kv_heads, pt.heads.head_dim
    g = h // hkv
    if cfg["kernel"] == "splitkv":
        block_q = default_block_q(g, pt.q.dtype)
    elif cfg["block_m"] is None:
        block_q = default_block_q(g, pt.q.dtype)
    else:
        block_q = cfg["block_m"] // g
    tile_seq, tile_off = plan_query_tiles([pt.c], [0], block_q)
    # The engine's split rule for each kernel (`KernelBackend.chunk_splits`); "waves" overrides it
    tma = cfg["kernel"] == "tma"
    splits = choose_chunk_splits(
        len(tile_seq), hkv, pt.prefix + pt.c, num_sms, cfg.get("waves", PAGE_TILES_WAVES if tma else DEFAULT_WAVES),
        max_splits=PAGE_TILES_MAX_SPLITS if tma else MAX_SPLITS,
    )
    k, v, bt = pt.cache(cfg["page"])
    out = torch.empty_like(pt.q)
    lse = torch.empty(pt.c, h, dtype=torch.float32, device=pt.device)
    ws = None
    if splits > 1:
        ws = (
            torch.empty(pt.c, h, splits, d, device=pt.device),
            torch.empty(pt.c, h, splits, device=pt.device),
        )
    common = (pt.q, k, v, pt.qsl, pt.q_pos, pt.kv_start, pt.kv_lens, bt,
              torch.tensor(tile_seq, dtype=torch.int32, device=pt.device),
              torch.tensor(tile_off, dtype=torch.int32, device=pt.device), out, lse, d**-0.5, None)  # fmt: skip
    kw = dict(num_splits=splits, merge_rows=pt.merge_rows, block_q=block_q, workspace=ws)
    if cfg["kernel"] == "splitkv":
        fn = lambda: chunk_splitkv_attention(*common, **kw)  # noqa: E731
    else:
        opts = {x: cfg[x] for x in ("block_n", "num_warps", "num_stages", "use_tma")}
        fn = lambda: chunk_tma_attention(*common, **kw, **opts)  # noqa: E731
    fn()
    if pt.device == "cuda":
        ms = time_ms(fn, iters)  # after its own warm-up launch
    else:
        fn()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        ms = (time.perf_counter() - t0) / iters * 1e3
    flops, floor_s = pt.floor()
    res = {"ms": ms, "tflops": flops / ms * 1e-9, "floor_ms": floor_s * 1e3, "ratio_to_floor": ms / (floor_s * 1e3),
           "num_splits": splits, "block_q": block_q, "num_tiles": len(tile_seq)}  # fmt: skip
    if cfg["kernel"] == "tma" and cfg["block_n"] is None:  # what the defaults resolved to
        block_n = default_tma_block_n(cfg["page"], pt.q.dtype, d)
        _, block_m, _, warps, stages = tma_tile_launch(pt.q, g, block_q, block_n, None, None)
        res.update(resolved_block_n=block_n, resolved_block_m=block_m, resolved_num_warps=warps,
                   resolved_num_stages=stages)  # fmt: skip
    if pt.ref is None:
        pt.ref = (out.float().clone(), lse.clone())
    res["max_abs_diff_out"] = float((out.float() - pt.ref[0]).abs().max())
    res["max_abs_diff_lse"] = float((lse - pt.ref[1]).abs().max())
    return res


def run_sweep(args: argparse.Namespace, out_path: Path) -> None:
    """The sweep in this process; rewrites out_path after every config."""
    import torch

    from mnemosyne.kernels.chunk_splitkv_attention import _chunk_split_kernel
    from mnemosyne.kernels.chunk_tma_attention import _chunk_tma_kernel

    device = "cpu" if args.smoke else "cuda"
    torch.manual_seed(0)
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count if device == "cuda" else 4
    chunks, prefixes = args.chunks, args.prefixes
    max_tokens = -(-(max(prefixes) + max(chunks)) // 128) * 128
    heads = Heads.of(args.shape)
    k_flat = torch.randn(max_tokens, heads.num_kv_heads, heads.head_dim, device=device, dtype=torch.bfloat16)
    v_flat = torch.randn_like(k_flat)
    variants = wide_tile_configs if args.wide_tiles else variant_configs
    configs = baseline_configs(args.smoke) + variants(args.smoke)
    compile_info: dict[str, dict | None] = {}
    failed: dict[str, str] = {}
    seen = {"splitkv": set(), "tma": set()}
    jit = {"splitkv": _chunk_split_kernel, "tma": _chunk_tma_kernel}
    # Resumed after this process died: keep its rows, never rerun what killed it.
    results: list[dict] = json.loads(out_path.read_text()) if out_path.exists() else []
    for r in results:
        if "error" in r:
            failed[config_key(r)] = r["error"]
        compile_info.setdefault(config_key(r), r.get("compiled"))
    done = {(config_key(r), r["chunk"], r["prefix"]) for r in results}
    inflight = out_path.with_suffix(".inflight")
    if inflight.exists():
        failed[inflight.read_text()] = "the process died running it (compiler crash or sticky CUDA error)"
    # The key point first (all configs compile there), then the rest.
    points = sorted(itertools.product(chunks, prefixes), key=lambda p: (p != (128, prefixes[0]), p[1], p[0]))

    def measure(pt: Point, cfg: dict) -> None:
        key = config_key(cfg)
        if (key, pt.c, pt.prefix) in done:
            return
        row = dict(cfg, chunk=pt.c, prefix=pt.prefix, shuffled=args.shuffled)
        if time.time() > args.deadline:
            row["skipped"] = "budget"
        elif key in failed:
            row["error"] = failed[key]
        else:
            inflight.write_text(key)
            try:
                row.update(run_config(pt, cfg, num_sms, args.iters))
                if key not in compile_info:
                    kind = cfg["kernel"]
                    compile_info[key], seen[kind] = compiled_info(jit[kind], seen[kind])
            except Exception as e:  # noqa: BLE001 (record and go on)
                failed[key] = f"{type(e).__name__}: {str(e)[:300]}"
                row["error"] = failed[key]
                traceback.print_exc()
            inflight.unlink()
        row["compiled"] = compile_info.get(key)
        results.append(row)
        print(json.dumps(row), flush=True)
        out_path.write_text(json.dumps(results, indent=1))
        if "error" in row and device == "cuda":
            try:  # a sticky CUDA error poisons every later config: restart the process
                torch.cuda.synchronize()
            except Exception:  # noqa: BLE001
                sys.exit(RESTART_RC)

    for n_point, (c, prefix) in enumerate(points):
        if n_point == 1:  # after the key point: fastest configs first, in case the budget runs out
            ms_at_key = {config_key(r): r.get("ms", float("inf")) for r in results}
            configs.sort(key=lambda cfg: (cfg["kernel"] != "splitkv", ms_at_key.get(config_key(cfg), 0.0)))
        pt = Point(k_flat, v_flat, c, prefix, args.shuffled, device, heads)
        run_config(pt, baseline_configs(True)[0], num_sms, 1)  # the reference output of this point
        for cfg in configs:
            measure(pt, cfg)
        # The split count of the best TMA config here, at other programs-per-SM targets.
        best = min((r for r in results if (r["chunk"], r["prefix"], r["kernel"]) == (c, prefix, "tma")
                    and "ms" in r and "waves" not in r), key=lambda r: r["ms"], default=None)  # fmt: skip
        if best is not None:
            for waves in (2, 4):
                measure(pt, dict({k: best[k] for k in CONFIG_FIELDS if k in best}, waves=waves))
        del pt
        if device == "cuda":
            torch.cuda.empty_cache()


def summarize(rows: list[dict]) -> list[dict]:
    """Per (c, P): the best split-KV and the best TMA time, and the TMA variant's options."""
    best: dict[tuple, dict] = {}
    for r in rows:
        if "ms" not in r:
            continue
        k = (r["chunk"], r["prefix"], r["kernel"])
        if k not in best or r["ms"] < best[k]["ms"]:
            best[k] = r
    out = []
    for c, p in sorted({(r["chunk"], r["prefix"]) for r in rows}):
        s, t = best.get((c, p, "splitkv")), best.get((c, p, "tma"))
        out.append({
            "chunk": c, "prefix": p, "floor_ms": (s or t or {}).get("floor_ms"),
            "splitkv_best_ms": s and s["ms"], "splitkv_best_page": s and s["page"],
            "tma_best_ms": t and t["ms"], "tma_best_ratio_to_floor": t and t["ratio_to_floor"],
            "tma_best_tflops": t and t["tflops"],
            "tma_best_splits": t and t["num_splits"],
            "tma_best_options": t and {x: t[x] for x in CONFIG_FIELDS[1:] if x in t},
        })  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument(
        "--shape", default="llama3-8b", choices=["llama3-8b", "llama3.2-1b"], help="whose attention heads"
    )
    ap.add_argument("--chunks", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    ap.add_argument("--prefixes", type=int, nargs="+", default=[131072, 524288])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--budget-s", type=float, default=260.0, help="wall clock of the sweep")
    ap.add_argument("--shuffled", action="store_true", help="128-token runs of blocks in a random order")
    ap.add_argument("--smoke", action="store_true", help="CPU interpreter, tiny sizes: checks the script")
    ap.add_argument("--wide-tiles", action="store_true", help="only 256-row query tiles beside the defaults")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # internal: sweep in this process
    ap.add_argument("--deadline", type=float, default=float("inf"), help=argparse.SUPPRESS)  # epoch seconds
    args = ap.parse_args()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        args.chunks, args.prefixes, args.iters = [3, 20], [100], 1
    if args.child:
        run_sweep(args, args.out)
        return

    t0 = time.monotonic()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        sweep_out = Path(tmp) / "sweep.json"
        cmd = [sys.executable, "-m", "benchmarks.chunk_kernel_variants", "--child", "--out", str(sweep_out), "--shape", args.shape,
               "--chunks", *map(str, args.chunks), "--prefixes", *map(str, args.prefixes),
               "--iters", str(args.iters), "--deadline", str(time.time() + args.budget_s - 25)]  # fmt: skip
        cmd += ["--shuffled"] * args.shuffled + ["--smoke"] * args.smoke + ["--wide-tiles"] * args.wide_tiles
        for attempt in range(MAX_RESTARTS + 1):  # a sweep process that died resumes from its rows
            left = args.budget_s - (time.monotonic() - t0)
            try:
                proc = subprocess.run(cmd, stderr=subprocess.PIPE, text=True, timeout=left + 20)
                rc, tail = proc.returncode, (proc.stderr or "")[-3000:]
            except subprocess.TimeoutExpired as e:
                rc, tail = "timeout", str(e.stderr or "")[-3000:]
            if rc in (0, "timeout") or left < 30:
                break
            print(f"sweep process died (rc {rc}, attempt {attempt}): resuming", flush=True)
        rows = json.loads(sweep_out.read_text()) if sweep_out.exists() else []
        process = {"returncode": rc, "attempts": attempt + 1, "rows": len(rows),
                   "stderr_tail": tail if rc != 0 else ""}  # fmt: skip
        print(f"sweep: rc {rc}, {len(rows)} rows, {time.monotonic() - t0:.0f} s", flush=True)

    from mnemosyne.bench.long_context.run import device_info

    result = {
        "command": " ".join(["python -m benchmarks.chunk_kernel_variants", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": device_info(), "shape": {"model": args.shape, **dataclasses.asdict(Heads.of(args.shape)), "dtype": "bfloat16"},
        "floors": {"attention_flops_per_s": ATTN_FLOPS, "copy_bytes_per_s": COPY_BPS},
        "seconds": time.monotonic() - t0, "process": process, "summary": summarize(rows), "results": rows,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    for s in result["summary"]:
        print(json.dumps(s))
    print(f"wrote {args.out} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
