"""The split-KV decode kernel (`kernels/decode_attention.py`) under other launch options:
key tile (block_n), warps, pipeline stages and split waves (programs per SM the split
budget aims at), per batch shape, beside the bytes floor. One GPU::

    python -m benchmarks.probes.decode_kernel_options --head-dim 64 --out OUT.json
    python -m benchmarks.probes.decode_kernel_options --head-dim 128 --cases 1:131072,32:1024 \
        --block-n 64,128 --warps 4,8 --stages 2,3 --waves 2,4 --out OUT.json

A case is 'N:keys' (N decodes of that many keys each), joined by '+' for a mixed batch
('1:1048576+16:1024'). Each sequence's keys lie in consecutive blocks of a random bf16
cache (the engine's placement of a long prompt), or in shuffled blocks with --shuffle.
Per option: the median over --repeats replays of a CUDA graph of 10 launches (phase 1 and
the merge; the host's launch work is not timed, as in the engine's decode graphs), per
launch, the KV bytes read / time, and time / floor, floor = KV
bytes / 4.2 TB/s (the copy ceiling measured on these H200s). Every option's output is
checked against the engine's default launch (max |diff|). The engine's default for the
head dim is marked `default`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from mnemosyne.kernels.decode_attention import paged_decode_attention
from mnemosyne.kernels.decode_items import choose_split_budget, decode_workspace_items, default_waves
from mnemosyne.kernels.decode_launch import launch_options
from mnemosyne.layers.attention.metadata import AttentionMetadata

COPY_BYTES_PER_S = 4.2e12
GRAPH_LAUNCHES = 10
DEFAULT_CASES = "1:1048576,1:131072,1:1048576+16:1024,32:1024"


def parse_case(case: str) -> list[int]:
    """'1:1048576+16:1024' -> [1048576] + [1024] * 16 (keys per decode)."""
    keys = []
    for part in case.split("+"):
        n, k = map(int, part.split(":"))
        keys += [k] * n
    return keys


def random_batch(
    keys: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    shuffle: bool,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
    """(query [n, H, D], k_cache, v_cache, metadata, seq_ids) of n decodes."""
    num_blocks = sum(-(-k // block_size) for k in keys)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, dtype=torch.bfloat16, device=device)
    v_cache = torch.randn(shape, dtype=torch.bfloat16, device=device)
    order = torch.randperm(num_blocks).tolist() if shuffle else list(range(num_blocks))
    tables, b0 = [], 0
    for k in keys:
        n = -(-k // block_size)
        tables.append(order[b0 : b0 + n])
        b0 += n
    meta = AttentionMetadata.build(
        [1] * len(keys), [k - 1 for k in keys], [0] * len(keys), keys, tables, [-1] * len(keys), device
    )
    query = torch.randn(len(keys), num_heads, head_dim, dtype=torch.bfloat16, device=device)
    seq_ids = torch.arange(len(keys), dtype=torch.int32, device=device)
    return query, k_cache, v_cache, meta, seq_ids


def default_option(head_dim: int) -> tuple[int, int, int, int]:
    """(block_n, warps, stages, waves) the engine launches at this head dim (bf16)."""
    return (*launch_options(head_dim, torch.bfloat16), default_waves(head_dim))


def _time_us(run: Callable[[], None], cuda: bool, repeats: int) -> float:
    """Median time of one launch in microseconds: on CUDA, GRAPH_LAUNCHES launches captured in
    a CUDA graph, replayed between two events (so the host's launch work is not timed, as in
    the engine's decode graphs); on CPU, host-timed."""
    if not cuda:
        t0 = time.perf_counter()
        run()
        return (time.perf_counter() - t0) * 1e6
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GRAPH_LAUNCHES):
            run()
    graph.replay()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / GRAPH_LAUNCHES)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--num-heads", type=int, default=32)
    ap.add_argument("--num-kv-heads", type=int, default=8)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--cases", default=DEFAULT_CASES)
    ap.add_argument("--block-n", default="32,64,128,256")
    ap.add_argument("--warps", default="2,4,8")
    ap.add_argument("--stages", default="2,3,4")
    ap.add_argument("--waves", default="2,4,8")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--shuffle", action="store_true")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run under TRITON_INTERPRET=1 (host-timed)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count if cuda else 4
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    default = default_option(args.head_dim)
    options = sorted(
        set(itertools.product(ints(args.block_n), ints(args.warps), ints(args.stages), ints(args.waves)))
    )
    options = [default] + [o for o in options if o != default]
    result = {
        "command": "python -m benchmarks.probes.decode_kernel_options "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "shuffle")
        + (" --shuffle" if args.shuffle else ""),
        "device": torch.cuda.get_device_name(device) if cuda else "cpu (Triton interpreter)",
        "date": time.strftime("%Y-%m-%d"),
        "default": dict(zip(("block_n", "warps", "stages", "waves"), default, strict=True)),
        "cases": [],
    }
    for case in args.cases.split(","):
        keys = parse_case(case)
        query, k_cache, v_cache, meta, seq_ids = random_batch(
            keys, args.num_heads, args.num_kv_heads, args.head_dim, args.block_size, args.shuffle, device
        )
        kv_bytes = 2 * sum(keys) * args.num_kv_heads * args.head_dim * 2
        floor_us = kv_bytes / COPY_BYTES_PER_S * 1e6
        lengths = (meta.query_start_loc, meta.q_pos_start, meta.kv_start, meta.kv_lens, meta.block_tables)
        ref = None
        rows = []
        for block_n, warps, stages, waves in options:
            budget = choose_split_budget(args.num_kv_heads, num_sms, waves=waves, head_dim=args.head_dim)
            items = decode_workspace_items(len(keys), budget)
            ws = (
                torch.empty(args.num_heads, items, args.head_dim, dtype=torch.float32, device=device),
                torch.empty(args.num_heads, items, dtype=torch.float32, device=device),
            )
            out = torch.full_like(query, float("nan"))
            lse = torch.empty(len(keys), args.num_heads, dtype=torch.float32, device=device)

            run = partial(
                paged_decode_attention, query, k_cache, v_cache, *lengths, seq_ids, out, lse,
                1.0 / args.head_dim**0.5, None, budget, block_n=block_n, num_warps=warps, num_stages=stages,
                workspace=ws,
            )  # fmt: skip

            try:
                run()
                if cuda:
                    torch.cuda.synchronize()
            except Exception as e:  # an option Triton cannot compile or launch (resources)
                rows.append({"block_n": block_n, "warps": warps, "stages": stages, "waves": waves,
                             "error": f"{type(e).__name__}: {str(e)[:200]}"})  # fmt: skip
                continue
            if ref is None:
                ref = out.clone()
            diff = (out.float() - ref.float()).abs().max().item()
            us = _time_us(run, cuda, args.repeats)
            rows.append({
                "block_n": block_n, "warps": warps, "stages": stages, "waves": waves, "split_budget": budget,
                "us": round(us, 2), "tb_per_s": round(kv_bytes / us / 1e6, 3), "x_floor": round(us / floor_us, 3),
                "max_abs_diff": diff, "default": (block_n, warps, stages, waves) == default,
            })  # fmt: skip
        ok = [r for r in rows if "us" in r]
        best = min(ok, key=lambda r: r["us"])
        entry = {"case": case, "kv_bytes": kv_bytes, "floor_us": round(floor_us, 2), "best": best,
                 "default_us": ok[0]["us"] if ok and ok[0]["default"] else None, "options": rows}  # fmt: skip
        result["cases"].append(entry)
        print(json.dumps({k: v for k, v in entry.items() if k != "options"}), flush=True)
        del k_cache, v_cache
        if cuda:
            torch.cuda.empty_cache()
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
