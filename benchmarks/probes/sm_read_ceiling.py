"""How fast a few SMs can read HBM: the ceiling under the decodes' K/V reads on a lane split.

The question: beside a prefill lane chunk the engine's steps run on 16-24 SMs of a green
context, where the split-KV decode kernel reads K/V at ~47 GB/s per SM and the steps' GEMMs
at ~90 (benchmarks/results/README.md, "Twenty-sixth session"). Late in the 8B mixed scenario
the decodes' K/V then need 24 SMs, and the lane's chunks run at ~1.5x instead of ~1.3x their
floor. Is 47 GB/s per SM a property of the kernel (its access pattern, its bytes in flight)
or of the hardware? This probe reads bf16 rows with the decode kernel's inner step (a tile
into shared memory, a tl.dot against 16 query rows), a fixed number of programs per SM
each reading every num_programs-th tile, on S confined SMs and on every SM, in these
patterns:

    contig      rows of 2 KB (all 8 KV heads of a slot, as the cache holds them), contiguous
    head        one KV head's 256 B of each slot, 2 KB apart (what one decode program reads)
    paged       one KV head's 256 B of each slot of scattered 64-slot pages (the decode
                kernel's real pattern, a page table lookup per tile)
    paged_tma   the same through TMA boxes (`TensorDescriptor`, as `chunk_tma_attention`)

    python -m benchmarks.probes.sm_read_ceiling --out OUT.json [--sms 16,24,0] [--mib 512]

Per (SMs, pattern, tile rows, stages, programs per SM): the median time of a CUDA-graph replay
on the confined stream, and GB/s per SM. Needs a GPU and cuda-bindings.
"""

from __future__ import annotations

import argparse
import functools
import json
from datetime import UTC, datetime
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from benchmarks.probes.confined_decode import graph_ms
from mnemosyne.worker.green_context import split_sms

NUM_KV_HEADS, HEAD_DIM, PAGE = 8, 128, 64
PATTERNS = ("contig", "head", "paged", "paged_tma")


@triton.jit
def _read_kernel(
    src, bt_ptr, out_ptr, tiles_per_prog, num_progs, stride_row,
    COLS: tl.constexpr, BR: tl.constexpr, PATTERN: tl.constexpr,
):  # fmt: skip
    """Program p reads tiles p, p + num_progs, ... (tiles_per_prog of them) of BR rows x COLS;
    PATTERN 0 contig / 1 head: tile t's rows are t*BR .. (row stride stride_row); 2 paged /
    3 paged_tma: rows page(t)*PAGE + (t*BR % PAGE) .., page(t) = bt[t*BR // PAGE]."""
    pid = tl.program_id(0)
    q = tl.full([16, COLS], 1.0, tl.float32).to(tl.bfloat16)
    acc = tl.zeros([16, BR], tl.float32)
    offs_r = tl.arange(0, BR)
    offs_c = tl.arange(0, COLS)
    for i in range(0, tiles_per_prog):
        t = pid + i * num_progs
        row0 = t * BR
        if PATTERN >= 2:
            page = tl.load(bt_ptr + row0 // 64)
            row0 = page * 64 + row0 % 64
        if PATTERN == 3:
            k = src.load([row0, 0])
        else:
            k = tl.load(src + (row0.to(tl.int64) + offs_r)[:, None] * stride_row + offs_c[None, :])
        acc += tl.dot(q, tl.trans(k))
    tl.store(out_ptr + pid * BR + offs_r, tl.sum(acc, 0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sms", default="16,24,0", help="confined SM counts; 0: every SM")
    ap.add_argument("--mib", type=int, default=512, help="bytes read per launch")
    ap.add_argument("--stages", default="2,3,4,6")
    ap.add_argument("--progs-per-sm", default="1,2,4")
    ap.add_argument("--out", type=Path, required=True)
    ns = ap.parse_args()
    dev = torch.device("cuda")
    num_sms_device = torch.cuda.get_device_properties(dev).multi_processor_count
    slot_bytes = NUM_KV_HEADS * HEAD_DIM * 2
    num_slots = ns.mib * 2**20 // slot_bytes  # slots of all heads holding --mib bytes
    # [slots, kv_heads x head_dim]: 8x that many slots, since one head's patterns read 1/8 of each
    cache = torch.randn(NUM_KV_HEADS * num_slots, NUM_KV_HEADS * HEAD_DIM, device=dev, dtype=torch.bfloat16)
    num_pages = cache.shape[0] // PAGE
    bt = torch.randperm(num_pages, device=dev).to(torch.int32)  # scattered pages, as served
    desc = TensorDescriptor.from_tensor(cache, [PAGE, HEAD_DIM])
    rows = []
    for sms in (int(s) for s in ns.sms.split(",")):
        stream = torch.cuda.Stream(dev) if sms == 0 else split_sms(dev, sms).first
        num_sms = sms or num_sms_device
        for pattern in PATTERNS:
            cols = NUM_KV_HEADS * HEAD_DIM if pattern == "contig" else HEAD_DIM
            for br in ((16, 32) if pattern == "contig" else (64,)):
                tile_bytes = br * cols * 2
                num_tiles = ns.mib * 2**20 // tile_bytes
                src = desc if pattern == "paged_tma" else cache
                stride_row = cache.stride(0)
                for stages in (int(s) for s in ns.stages.split(",")):
                    for pps in (int(p) for p in ns.progs_per_sm.split(",")):
                        num_progs = num_sms * pps
                        per_prog = num_tiles // num_progs
                        out = torch.empty(num_progs * br, device=dev, dtype=torch.float32)
                        run = functools.partial(
                            _read_kernel[(num_progs,)], src, bt, out, per_prog, num_progs, stride_row,
                            COLS=cols, BR=br, PATTERN=PATTERNS.index(pattern), num_warps=4, num_stages=stages,
                        )  # fmt: skip
                        key = {"sms": sms, "pattern": pattern, "tile_rows": br, "stages": stages, "progs_per_sm": pps}
                        try:
                            ms = graph_ms(stream, run)
                        except Exception as e:  # e.g. out of shared memory
                            rows.append(key | {"error": str(e)[:200]})
                            continue
                        nbytes = per_prog * num_progs * tile_bytes
                        row = key | {"us": 1e3 * ms, "gbps_per_sm": nbytes / (ms * 1e-3) / 1e9 / num_sms,
                                     "tb_per_s": nbytes / (ms * 1e-3) / 1e12}  # fmt: skip
                        rows.append(row)
                        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}),
                              flush=True)  # fmt: skip
    ns.out.write_text(json.dumps({
        "probe": "sm_read_ceiling", "date": datetime.now(UTC).isoformat(), "device": torch.cuda.get_device_name(),
        "torch": torch.__version__, "triton": triton.__version__, "args": vars(ns) | {"out": str(ns.out)},
        "rows": rows,
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
