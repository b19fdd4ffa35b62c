"""Probe: the split-KV chunk kernel's launch options at one layer of Llama-3-8B heads, one GPU.

    python -m benchmarks.probes.chunk_kernel_probe --out benchmarks/results/probes/chunk_kernel_probe_h200_DATE.json

One chunk of c queries after P keys (32 query / 8 KV heads, head dim 128, bf16, blocks in one
ascending run), `chunk_splitkv_attention` forced with each (block_q, block_n, num_warps,
num_stages, page) option; the split count as the backend picks it (4 programs per SM).
Beside it, the dense reference: torch SDPA (cuDNN, then flash) on contiguous tensors of the
same work, cut into as many key ranges as there are splits (batch = splits, no causal mask;
the chunk's own causal keys are a rounding error at these P).

Per point: ms (CUDA events, >= 20 launches after a warm-up), effective TFLOP/s
(4 h d (c P + c (c + 1) / 2) / t), floor = max(FLOPs / 590 TFLOP/s, KV bytes / 4.2 TB/s),
and whether the compiled PTX holds wgmma (Hopper's warpgroup MMA), registers and spills.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import traceback
from pathlib import Path

import torch
import triton

from mnemosyne.bench.long_context.kernels import time_ms

H, HKV, D = 32, 8, 128
DTYPE = torch.bfloat16


def _floor_ms(c: int, prefix: int) -> tuple[float, float]:
    flops = 4 * H * D * (c * prefix + c * (c + 1) / 2)
    nbytes = 2 * (prefix + c) * HKV * D * 2
    return flops, max(flops / 590e12, nbytes / 4.2e12) * 1e3


def _compiled_info(kernel) -> dict:
    """wgmma / registers / spills of the newest compiled variant of a @triton.jit function."""
    try:
        caches = kernel.device_caches[torch.cuda.current_device()][0]
        compiled = list(caches.values())[-1]
        ptx = compiled.asm.get("ptx", "")
        return {"wgmma": "wgmma" in ptx, "mma_sync": "mma.sync" in ptx, "cp_async": "cp.async" in ptx,
                "n_regs": compiled.n_regs, "n_spills": compiled.n_spills}  # fmt: skip
    except Exception as e:  # noqa: BLE001 (a probe: report and go on)
        return {"info_error": f"{type(e).__name__}: {e}"[:200]}


def triton_point(c: int, prefix: int, page: int, block_q: int, block_n: int, warps: int, stages: int) -> dict:
    from mnemosyne.kernels import chunk_splitkv_attention as mod
    from mnemosyne.kernels.paged_prefill import plan_query_tiles

    total = prefix + c
    nb = -(-total // page)
    k_cache = torch.randn(nb, page, HKV, D, device="cuda", dtype=DTYPE)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(c, H, D, device="cuda", dtype=DTYPE)
    dev = dict(device="cuda")
    qsl = torch.tensor([0, c], dtype=torch.int32, **dev)
    q_pos = torch.tensor([prefix], dtype=torch.int64, **dev)
    kv_start = torch.tensor([0], dtype=torch.int64, **dev)
    kv_lens = torch.tensor([total], dtype=torch.int32, **dev)
    bt = torch.arange(nb, dtype=torch.int32, **dev)[None]
    tile_seq, tile_off = plan_query_tiles([c], [0], block_q)
    tile_seq_t = torch.tensor(tile_seq, dtype=torch.int32, **dev)
    tile_off_t = torch.tensor(tile_off, dtype=torch.int32, **dev)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    splits = mod.choose_chunk_splits(len(tile_seq), HKV, total, sms)
    out = torch.empty_like(q)
    lse = torch.empty(c, H, dtype=torch.float32, **dev)
    rows = torch.arange(c, dtype=torch.int32, **dev)
    ws = (
        torch.empty(c, H, splits, D, dtype=torch.float32, **dev),
        torch.empty(c, H, splits, dtype=torch.float32, **dev),
    )

    def run() -> None:
        mod.chunk_splitkv_attention(
            q, k_cache, v_cache, qsl, q_pos, kv_start, kv_lens, bt, tile_seq_t, tile_off_t, out, lse,
            D**-0.5, None, num_splits=splits, merge_rows=rows, block_q=block_q, block_n=block_n,
            num_warps=warps, num_stages=stages, workspace=ws,
        )  # fmt: skip

    ms = time_ms(run, iters=20)
    flops, floor = _floor_ms(c, prefix)
    return {"path": "triton", "chunk": c, "prefix": prefix, "page": page, "block_q": block_q,
            "block_n": block_n, "num_warps": warps, "num_stages": stages, "splits": splits,
            "ms": ms, "tflops": flops / ms * 1e-9, "floor_ms": floor, "ratio_to_floor": ms / floor,
            **_compiled_info(mod._chunk_split_kernel)}  # fmt: skip


def dense_point(c: int, prefix: int, splits: int, backend) -> dict:
    from torch.nn.attention import sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    n = prefix // splits
    q = torch.randn(splits, H, c, D, device="cuda", dtype=DTYPE)
    k = torch.randn(splits, HKV, n, D, device="cuda", dtype=DTYPE)
    v = torch.randn_like(k)
    with sdpa_kernel(backend):
        ms = time_ms(lambda: sdpa(q, k, v, enable_gqa=True), iters=20)
    flops, floor = _floor_ms(c, prefix)
    return {"path": f"dense_{backend.name}", "chunk": c, "prefix": prefix, "splits": splits,
            "ms": ms, "tflops": flops / ms * 1e-9, "floor_ms": floor, "ratio_to_floor": ms / floor}  # fmt: skip


def main() -> None:
    from torch.nn.attention import SDPBackend

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--prefix", type=int, default=1 << 17)
    args = ap.parse_args()
    rows: list[dict] = []

    def record(fn, *a) -> dict | None:
        try:
            r = fn(*a)
        except Exception as e:  # noqa: BLE001 (a probe: report and go on)
            r = {"args": [str(x) for x in a], "error": f"{type(e).__name__}: {e}"[:300]}
            traceback.print_exc()
        print(json.dumps(r), flush=True)
        rows.append(r)
        torch.cuda.empty_cache()
        return r

    grid = list(itertools.product((16, 32, 64), (64, 128), (4, 8), (2, 3, 4)))
    for c in (32, 128):
        for bq, bn, w, s in grid:
            record(triton_point, c, args.prefix, 16, bq, bn, w, s)
    ok = [r for r in rows if "ms" in r]
    best = {c: min((r for r in ok if r["chunk"] == c), key=lambda r: r["ms"]) for c in (32, 128)}
    for c, b in best.items():  # the best option with big pages, at every chunk size and a longer prefix
        record(triton_point, c, args.prefix, 128, b["block_q"], b["block_n"], b["num_warps"], b["num_stages"])
    for c in (16, 64, 256):
        b = best[32 if c <= 64 else 128]
        record(triton_point, c, args.prefix, 16, b["block_q"], b["block_n"], b["num_warps"], b["num_stages"])
        record(triton_point, c, args.prefix, 16, 32, 64, 4, 3)  # today's default
    for c in (32, 128):
        b = best[c]
        record(triton_point, c, 1 << 19, 16, b["block_q"], b["block_n"], b["num_warps"], b["num_stages"])
        record(triton_point, c, 1 << 19, 16, 32, 64, 4, 3)
        for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
            record(dense_point, c, args.prefix, 32, backend)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": "python -m benchmarks.probes.chunk_kernel_probe --out " + str(args.out),
        "device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
        "torch": torch.__version__, "triton": triton.__version__, "rows": rows,
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
