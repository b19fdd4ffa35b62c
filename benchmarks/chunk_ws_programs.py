"""One layer's chunk attention through the engine's backend: the Triton TMA kernel against the
warp-specialized Gluon kernel at several program counts and split caps.

    python -m benchmarks.chunk_ws_programs --out benchmarks/results/.../chunk_ws_programs.json

Why: alone (benchmarks/probes/gluon_chunk_prefix.py) the warp-specialized kernel ran 32-128-token
chunks after 128K-512K keys 7-22% faster than the TMA kernel, but inside the engine, with one
wave of programs and the split count each tile's share of that wave, whole-model chunk steps
were 0-19% slower (session 19). The probe's fastest runs had several waves of programs
(e.g. 32 splits of 2 tiles x 8 KV heads = 512 programs). This sweeps what the engine chooses:

    programs   = the grid: k x the SM count (k = 1: one wave, the engine's rule; k > 1: the
                 device's split rule aims at k programs per SM and the hardware queues them)
    max_splits = the workspace's split cap (ChunkKernelConfig.max_splits; None: the engine's)

Heads of --shape (Llama-3-8B: 32 / 8, head dim 128), bf16, 64-key blocks, one sequence: a chunk
of c queries after P keys, blocks ascending (the engine's layout of a long request). Each
config is `KernelBackend.forward` (split phase + merge, the plan made once), timed with CUDA
events over --iters launches after warm-up; floor = max(FLOPs / 590 TFLOP/s, K/V bytes /
4.2 TB/s); every output checked against the TMA kernel's (max |diff|).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import json
from pathlib import Path

import torch

SHAPES = {"llama3-8b": (32, 8, 128), "llama3.2-1b": (32, 8, 64)}


def _time_ms(backend, args: tuple, iters: int) -> float:
    """Milliseconds per `backend.forward(*args)`, CUDA events over iters calls after 3."""

    def fn() -> None:
        backend.forward(*args)

    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main(argv: list[str] | None = None) -> int:
    from mnemosyne.bench.long_context.engine import synthetic_meta
    from mnemosyne.bench.long_context.run import device_info
    from mnemosyne.kernels.chunk_ws_attention import chunk_ws_attention
    from mnemosyne.latency.kernel_cost import ChunkPath
    from mnemosyne.layers.attention import kernel_backend
    from mnemosyne.layers.attention.kernel_backend import KernelBackend
    from mnemosyne.layers.attention.kernel_plan import ChunkKernelConfig
    from mnemosyne.layers.attention.metadata import AttentionMetadata

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--chunks", default="16,32,64,128,256")
    ap.add_argument("--prefixes", default="131072,524288")
    ap.add_argument("--waves", default="1,2,3,4,8", help="programs = k x SMs for each k")
    ap.add_argument("--max-splits", default="0,64", help="0: the engine's cap")
    ap.add_argument("--layouts", default="ascending", help="ascending,shuffled: the sequence's blocks")
    ap.add_argument("--strided", default="0", help="0,1: the ws kernel's strided_splits")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--out", type=Path, required=True)
    ns = ap.parse_args(argv)
    num_heads, num_kv_heads, head_dim = SHAPES[ns.shape]
    dev, dtype, block = torch.device("cuda"), torch.bfloat16, 64
    prefixes = [int(p) for p in ns.prefixes.split(",")]
    chunks = [int(c) for c in ns.chunks.split(",")]
    num_blocks = -(-(max(prefixes) + max(chunks)) // block) + 1
    gen = torch.Generator(device=dev).manual_seed(0)
    shape = (num_blocks, block, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen, device=dev, dtype=dtype)
    v_cache = torch.randn(shape, generator=gen, device=dev, dtype=dtype)
    num_sms = torch.cuda.get_device_properties(dev).multi_processor_count
    result: dict = {
        "benchmark": "chunk_ws_programs", "date": datetime.date.today().isoformat(), "device": device_info(),
        "gpu": torch.cuda.get_device_name(), "num_sms": num_sms, "shape": ns.shape, "rows": [],
        "command": "python -m benchmarks.chunk_ws_programs " + " ".join(argv if argv is not None else []),
    }  # fmt: skip
    scale = head_dim**-0.5
    for layout, prefix, c in itertools.product(ns.layouts.split(","), prefixes, chunks):
        meta = synthetic_meta(c, prefix, block)
        if layout == "shuffled":
            table = torch.randperm(num_blocks - 1, generator=gen, device=dev)[: meta.block_tables.shape[1]]
            meta = AttentionMetadata.build(
                query_lens=[c], q_pos_start=[prefix], kv_start=[0], kv_lens=[prefix + c],
                block_tables=[table.tolist()], slot_mapping=[-1] * c, device="cuda",
            )  # fmt: skip
        query = torch.randn(c, num_heads, head_dim, generator=gen, device=dev, dtype=dtype)
        flops = 4 * num_heads * head_dim * (c * prefix + c * (c + 1) / 2)
        kv_bytes = 2 * (prefix + c) * num_kv_heads * head_dim * 2
        floor_ms = max(flops / 590e12, kv_bytes / 4.2e12) * 1e3
        ref = None
        configs = [("tma", 1, 0, False)] + [
            ("ws", int(k), int(s), bool(int(st)))
            for k in ns.waves.split(",") for s in ns.max_splits.split(",") for st in ns.strided.split(",")
        ]  # fmt: skip
        for kernel, waves, max_splits, strided in configs:
            kernel_backend.chunk_ws_attention = functools.partial(chunk_ws_attention, strided_splits=strided)
            cfg = ChunkKernelConfig(warp_specialized=kernel == "ws", max_splits=max_splits or None)
            backend = KernelBackend(num_heads // num_kv_heads, head_dim, dtype, dev, chunk_config=cfg,
                                    force_path=ChunkPath.TRITON_SPLITKV)  # fmt: skip
            backend.num_sms = waves * num_sms
            meta.backend_plan = None
            row = {"layout": layout, "prefix": prefix, "chunk": c, "kernel": kernel, "strided": strided,
                   "programs": waves * num_sms, "max_splits": max_splits or None, "floor_ms": floor_ms}  # fmt: skip
            try:
                out, _ = backend.forward(query, k_cache, v_cache, meta, scale)
                row["splits_cap"] = meta.backend_plan.chunk_splits
                if ref is None:
                    ref = out.float()
                row["max_abs_diff_vs_tma"] = float((out.float() - ref).abs().max())
                ms = _time_ms(backend, (query, k_cache, v_cache, meta, scale), ns.iters)
                row.update(ms=ms, ratio=ms / floor_ms)
            except Exception as e:  # noqa: BLE001 (report and go on)
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(json.dumps(row), flush=True)
            result["rows"].append(row)
            ns.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
