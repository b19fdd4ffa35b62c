"""The cuDNN chunk path's prefix segments: one layer's attention of a c-token chunk after P
keys through `dense_chunk_attention`, with the prefix read in segments of S keys, against
one cuDNN call over every key (the `two_lane_overlap` probe's call: GQA folded, the chunk's
own keys unmasked, so c / P of the work is not the causal one).

The question: whole-model 4096-token chunks after 224K-240K keys ran their attention at
~567 TFLOP/s in the engine (`lane_chunk_profile`, the cuDNN path's 128K-key segments, each
its own call, merged), where the probe's single call ran at ~640. Which is it: the number
of calls and merges, or the graph cuDNN picks per key bucket?

    python -m benchmarks.probes.cudnn_segments --out OUT.json [--prefixes 65536,135168,229376,491520] \
        [--chunks 2048,4096] [--segments 65536,131072,262144,524288]

Needs a GPU (bf16). The blocks are one run of consecutive ids, as the engine places a
long prompt (kv_cache/block_pool.py), so every segment is a strided view of the cache.
"""

from __future__ import annotations

import argparse
import json
import statistics
from datetime import UTC, datetime
from pathlib import Path

import torch

from mnemosyne.kernels.cudnn_prefill import DenseChunk, _bshd, _cudnn, dense_chunk_attention

BLOCK = 64
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128  # Llama-3-8B


def timed_ms(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def flops(c: int, p: int) -> float:
    """Attention FLOPs of c queries after p keys plus their causal own keys (QK^T and PV)."""
    return 4.0 * c * (p + (c + 1) / 2) * NUM_HEADS * HEAD_DIM


def random_caches(num_keys: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """K / V caches of random bf16 values holding num_keys keys: [num_blocks, BLOCK, Hkv, D] each."""
    k_cache = torch.randn(-(-num_keys // BLOCK), BLOCK, NUM_KV_HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16)
    return k_cache, torch.randn_like(k_cache)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prefixes", default="65536,135168,229376,491520")
    ap.add_argument("--chunks", default="2048,4096")
    ap.add_argument("--segments", default="65536,131072,262144,524288")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path, required=True)
    ns = ap.parse_args()
    dev = torch.device("cuda")
    prefixes = [int(x) for x in ns.prefixes.split(",")]
    chunks = [int(x) for x in ns.chunks.split(",")]
    segments = [int(x) for x in ns.segments.split(",")]
    k_cache, v_cache = random_caches(max(prefixes) + max(chunks), dev)
    num_blocks = k_cache.shape[0]
    table = torch.arange(num_blocks, device=dev, dtype=torch.int32)
    scale = HEAD_DIM**-0.5
    rows = []
    for c in chunks:
        q = torch.randn(c, NUM_HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16)
        out = torch.empty_like(q)
        lse = torch.empty(c, NUM_HEADS, device=dev, dtype=torch.float32)
        g = NUM_HEADS // NUM_KV_HEADS
        q_fold = _bshd(q.view(c, NUM_KV_HEADS, g, HEAD_DIM).permute(2, 0, 1, 3).reshape(1, g * c, NUM_KV_HEADS, HEAD_DIM))
        for p in prefixes:
            n = p + c
            k_all = _bshd(k_cache.view(-1, NUM_KV_HEADS, HEAD_DIM)[:n].unsqueeze(0))
            v_all = _bshd(v_cache.view(-1, NUM_KV_HEADS, HEAD_DIM)[:n].unsqueeze(0))
            ms = timed_ms(lambda: _cudnn(q_fold, k_all, v_all, False, scale), ns.repeats)  # noqa: B023
            row = {"c": c, "prefix": p, "single_call_ms": ms, "single_call_tflops": flops(c, p) / ms / 1e9}
            chunk = DenseChunk(0, 0, c, p, True, (0, num_blocks))
            for s in segments:
                ms = timed_ms(
                    lambda: dense_chunk_attention(q, k_cache, v_cache, table, chunk, scale, s, out, lse),  # noqa: B023
                    ns.repeats,
                )
                row[f"segments_{s}_ms"] = ms
                row[f"segments_{s}_tflops"] = flops(c, p) / ms / 1e9
            rows.append(row)
            print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    ns.out.write_text(json.dumps({
        "probe": "cudnn_segments", "date": datetime.now(UTC).isoformat(), "device": torch.cuda.get_device_name(),
        "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(), "args": vars(ns) | {"out": str(ns.out)},
        "rows": rows,
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
