"""The split-KV decode kernel on a few SMs (a green context, as the steps run beside a prefill
lane chunk) under launch options and split budgets, against its K/V bytes.

The question: the steps' model beside a lane chunk (latency/beside_lane.py) found the
decodes' K/V reads on S confined SMs at 1.05x an average SM's share of the bandwidth,
where the weights' GEMMs pull 2.5x (benchmarks/results/README.md, "Twenty-fifth session").
Late in the 8B mixed scenario the decodes' K/V (32 x 3K keys, 12.6 GB a step) then take
most of a 16-SM step, and the lane must leave the steps 24-32 SMs. The kernel's launch
options are tuned for the whole GPU, where bandwidth, not bytes in flight per SM, bounds
it; on 16 SMs each SM must keep ~8x its whole-GPU share in flight.

    python -m benchmarks.probes.confined_decode --out OUT.json [--sms 16,24] [--decodes 32] \
        [--keys 1024,3072] [--configs 128:8:2,128:8:3,64:4:3,64:1:3:tma,...]

Per (SMs, keys, config, split budget): one layer's decode attention, replayed in a CUDA
graph captured on the confined stream (as the engine's per-split graphs), median time, and
the K/V bytes over it (GB/s per SM); a config ending in `:tma` loads its tiles as TMA boxes.
With --tma-configs, the same decodes as one-token chunks of the page-aligned chunk kernel (`chunk_tma_attention`: K/V pages by TMA boxes,
block_q 1 so each program's M tile is the G query heads of one KV head), per (block_n,
warps, stages) and split count (--tma-splits). Needs a GPU and cuda-bindings.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
from datetime import UTC, datetime
from pathlib import Path

import torch

from mnemosyne.kernels.chunk_tma_attention import chunk_tma_attention
from mnemosyne.kernels.decode_attention import paged_decode_attention
from mnemosyne.kernels.decode_items import choose_split_budget, decode_workspace_items
from mnemosyne.worker.green_context import split_sms

BLOCK = 64
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128  # Llama-3-8B


def graph_ms(stream: torch.cuda.Stream, fn, repeats: int = 20) -> float:
    with torch.cuda.stream(stream):
        fn()
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            fn()
        graph.replay()
        stream.synchronize()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            graph.replay()
            end.record(stream)
            end.synchronize()
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sms", default="16,24,0", help="confined SM counts; 0: every SM")
    ap.add_argument("--decodes", type=int, default=32)
    ap.add_argument("--keys", default="1024,3072")
    ap.add_argument("--configs", default="128:8:2,128:8:3,128:4:2,128:4:3,64:4:2,64:4:3,64:4:4,64:8:4,32:4:4,32:2:4")
    ap.add_argument("--budgets", default="auto,x2,x4")
    ap.add_argument("--tma-configs", default="", help="block_n:warps:stages of the chunk kernel; empty: none")
    ap.add_argument("--tma-splits", default="1,2")
    ap.add_argument("--out", type=Path, required=True)
    ns = ap.parse_args()
    dev = torch.device("cuda")
    num_sms_device = torch.cuda.get_device_properties(dev).multi_processor_count
    n = ns.decodes
    max_keys = max(int(k) for k in ns.keys.split(","))
    blocks_per_seq = -(-max_keys // BLOCK)
    k_cache = torch.randn(n * blocks_per_seq, BLOCK, NUM_KV_HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    perm = torch.randperm(n * blocks_per_seq, device=dev).to(torch.int32)  # scattered blocks, as served
    block_tables = perm.view(n, blocks_per_seq)
    query = torch.randn(n, NUM_HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16)
    out = torch.empty_like(query)
    lse = torch.empty(n, NUM_HEADS, device=dev, dtype=torch.float32)
    qsl = torch.arange(n + 1, device=dev, dtype=torch.int32)
    seq_ids = torch.arange(n, device=dev, dtype=torch.int32)
    kv_start = torch.zeros(n, device=dev, dtype=torch.int64)
    rows = []
    for sms in (int(s) for s in ns.sms.split(",")):
        stream = torch.cuda.Stream(dev) if sms == 0 else split_sms(dev, sms).first
        num_sms = sms or num_sms_device
        for keys in (int(k) for k in ns.keys.split(",")):
            kv_lens = torch.full((n,), keys, device=dev, dtype=torch.int32)
            q_pos = kv_lens.to(torch.int64) - 1
            kv_bytes = 2 * n * keys * NUM_KV_HEADS * HEAD_DIM * 2
            auto = choose_split_budget(NUM_KV_HEADS, num_sms, head_dim=HEAD_DIM)
            whole = choose_split_budget(NUM_KV_HEADS, num_sms_device, head_dim=HEAD_DIM)
            budgets = {"auto": auto, "x2": 2 * auto, "x4": 4 * auto, "whole": whole}
            for cfg in ns.configs.split(","):
                block_n, warps, stages = (int(x) for x in cfg.split(":")[:3])
                use_tma = cfg.endswith(":tma")
                for name in ns.budgets.split(",") + (["whole"] if sms else []):
                    budget = budgets[name]
                    items = decode_workspace_items(n, budget)
                    ws = (torch.empty(NUM_HEADS, items, HEAD_DIM, device=dev), torch.empty(NUM_HEADS, items, device=dev))

                    run = functools.partial(
                        paged_decode_attention, query, k_cache, v_cache, qsl, q_pos, kv_start, kv_lens, block_tables,
                        seq_ids, out, lse, HEAD_DIM**-0.5, None, budget, block_n, warps, stages, use_tma, ws,
                    )  # fmt: skip
                    try:
                        ms = graph_ms(stream, run)
                    except Exception as e:  # e.g. out of shared memory for this config
                        rows.append({"sms": sms, "keys": keys, "config": cfg, "budget": name, "error": str(e)[:200]})
                        continue
                    row = {"sms": sms, "keys": keys, "config": cfg, "budget": name, "split_budget": budget, "us": 1e3 * ms,
                           "gbps_per_sm": kv_bytes / (ms * 1e-3) / 1e9 / num_sms}  # fmt: skip
                    rows.append(row)
                    print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
            ref = out.clone()  # the decode kernel's last result: the chunk kernel's must match it
            tiles = torch.arange(n, device=dev, dtype=torch.int32)
            offsets = torch.zeros(n, device=dev, dtype=torch.int32)
            for cfg in filter(None, ns.tma_configs.split(",")):
                block_n, warps, stages = (int(x) for x in cfg.split(":"))
                for splits in (int(x) for x in ns.tma_splits.split(",")):
                    run = functools.partial(
                        chunk_tma_attention, query, k_cache, v_cache, qsl, q_pos, kv_start, kv_lens, block_tables,
                        tiles, offsets, out, lse, HEAD_DIM**-0.5, None, splits, tiles, 1, block_n, warps, stages,
                    )  # fmt: skip
                    name = f"tma:{cfg}"
                    try:
                        ms = graph_ms(stream, run)
                    except Exception as e:
                        rows.append({"sms": sms, "keys": keys, "config": name, "splits": splits, "error": str(e)[:200]})
                        continue
                    row = {"sms": sms, "keys": keys, "config": name, "splits": splits, "us": 1e3 * ms,
                           "gbps_per_sm": kv_bytes / (ms * 1e-3) / 1e9 / num_sms,
                           "max_abs_diff": (out.float() - ref.float()).abs().max().item()}  # fmt: skip
                    rows.append(row)
                    print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    ns.out.write_text(json.dumps({
        "probe": "confined_decode", "date": datetime.now(UTC).isoformat(), "device": torch.cuda.get_device_name(),
        "torch": torch.__version__, "args": vars(ns) | {"out": str(ns.out)}, "rows": rows,
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
