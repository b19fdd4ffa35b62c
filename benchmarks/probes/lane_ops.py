"""One layer's device work of a prefill-lane chunk, op by op, on every SM and on the lane's
SMs (a CUDA green context), with cuDNN's graphs built on either stream, alone and beside a
decode lane: 8B shape (32 query / 8 KV heads, head dim 128, hidden 4096, MLP 14336), bf16.

The question: after ~226K keys the engine's lane chunk took 1156 ms beside 32 decodes on 16
SMs, the `two_lane_overlap` probe's 953 ms (1.21x), while one layer's attention on every SM
is within 3% of the probe's call ("Thirtieth session", `c/`). The engine builds its cuDNN
graphs on the lane thread on a stream of every SM (`PrefillLane` runs `warm_up` with no
stream) and replays them on the lane's green context; the probe first calls each on the green
context itself. Settings, each op's median time over `--repeats` calls:

    whole         the device's own stream (every SM), graphs built there
    rest_reused   the lane's stream (all but `--free-sms` SMs), the graphs built on `whole`
    rest_own      the lane's stream, on a fresh thread whose first calls ran on that stream
                  (torch keeps cuDNN's graphs per thread, so they are built anew there)
    rest_beside   rest_own's thread and graphs, while the main thread replays a decode lane
                  (`--decodes` decodes of `--decode-keys` keys, the probe's decode graph) on
                  the other SMs back to back

Ops: `engine_exact` (`dense_chunk_attention` with the lane's exact segments and its own keys),
`engine_ragged` (the same without exact graphs), `exact` (one call over the prefix, q in BHSD
memory, K / V views of the cache), `bhsd` (contiguous BHSD K / V, no LSE: the probe's call),
and the layer's four GEMMs at `--chunk` rows (`F.linear`, as the engine's linears), each also
with cuBLAS told to leave the steps' SMs out (`_carveout`: torch's experimental SM carveout,
`--free-sms`) and with that on cuBLASLt (`_lt_carveout`): cuBLAS sizes its grids for every SM,
which on the lane's SMs leaves a partial last wave.

    python -m benchmarks.probes.lane_ops --out OUT.json [--prefix 229376] [--chunk 4096] [--free-sms 16]

Needs a GPU and `cuda-bindings` (green contexts).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.probes.cudnn_segments import HEAD_DIM, NUM_HEADS, NUM_KV_HEADS, flops, random_caches, timed_ms
from benchmarks.probes.two_lane_overlap import as_graph, decode_lane, make_weights, with_carveout
from mnemosyne.kernels import DENSE_SEGMENT_TOKENS, EXACT_SEGMENT_KEYS
from mnemosyne.kernels.cudnn_prefill import DenseChunk, _bshd, _cudnn, dense_chunk_attention
from mnemosyne.worker.green_context import split_sms

HIDDEN, INTER = 4096, 14336
GEMMS = {
    "qkv": (HIDDEN, HIDDEN + 2 * NUM_KV_HEADS * HEAD_DIM),
    "o": (HIDDEN, HIDDEN),
    "gate_up": (HIDDEN, 2 * INTER),
    "down": (INTER, HIDDEN),
}  # fmt: skip  (in, out)


def on_cublaslt(fn: Callable[[], object]) -> Callable[[], object]:
    """`fn` with torch's process-wide BLAS backend set to cuBLASLt, restored after the call."""

    def run() -> object:
        backend = torch.backends.cuda.preferred_blas_library()
        torch.backends.cuda.preferred_blas_library("cublaslt")
        try:
            return fn()
        finally:
            torch.backends.cuda.preferred_blas_library(backend)

    return run


def ops(c: int, p: int, device: torch.device, carveout: int) -> dict[str, tuple[Callable[[], object], float]]:
    """name -> (call, its FLOPs) for a c-token chunk after p keys (the module docstring)."""
    k_cache, v_cache = random_caches(p + c, device)
    g, scale, num_blocks = NUM_HEADS // NUM_KV_HEADS, HEAD_DIM**-0.5, k_cache.shape[0]
    table = torch.arange(num_blocks, device=device, dtype=torch.int32)
    q = torch.randn(c, NUM_HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16)  # [c, H, D]
    out, lse = torch.empty_like(q), torch.empty(c, NUM_HEADS, device=device, dtype=torch.float32)
    q_fold = _bshd(
        q.view(c, NUM_KV_HEADS, g, HEAD_DIM).permute(2, 0, 1, 3).reshape(1, g * c, NUM_KV_HEADS, HEAD_DIM)
    )
    k_view = _bshd(k_cache.view(-1, NUM_KV_HEADS, HEAD_DIM)[:p].unsqueeze(0))  # [1, Hkv, p, D], BSHD memory
    v_view = _bshd(v_cache.view(-1, NUM_KV_HEADS, HEAD_DIM)[:p].unsqueeze(0))
    q_bhsd, k_bhsd, v_bhsd = q_fold.contiguous(), k_view.contiguous(), v_view.contiguous()
    ragged = DenseChunk(0, 0, c, p, True, (0, num_blocks))
    exact = DenseChunk(0, 0, c, p, True, (0, num_blocks), exact_keys=EXACT_SEGMENT_KEYS)

    def bhsd() -> object:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q_bhsd, k_bhsd, v_bhsd, scale=scale)

    prefix_flops = flops(c, p) - flops(c, 0)
    table_ops: dict[str, tuple[Callable[[], object], float]] = {
        "engine_exact": (lambda: dense_chunk_attention(q, k_cache, v_cache, table, exact, scale, DENSE_SEGMENT_TOKENS, out, lse), flops(c, p)),
        "engine_ragged": (lambda: dense_chunk_attention(q, k_cache, v_cache, table, ragged, scale, DENSE_SEGMENT_TOKENS, out, lse), flops(c, p)),
        "exact": (lambda: _cudnn(q_bhsd, k_view, v_view, False, scale), prefix_flops),
        "bhsd": (bhsd, prefix_flops),
    }  # fmt: skip
    for name, (k, n) in GEMMS.items():
        x = torch.randn(c, k, device=device, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
        table_ops[name] = (lambda x=x, w=w: F.linear(x, w), 2.0 * c * k * n)
        carved = with_carveout(table_ops[name][0], carveout)
        table_ops[f"{name}_carveout"] = (carved, 2.0 * c * k * n)
        table_ops[f"{name}_lt_carveout"] = (on_cublaslt(carved), 2.0 * c * k * n)
    return table_ops


def time_ops(
    table: dict[str, tuple[Callable[[], object], float]], stream: torch.cuda.Stream, repeats: int
) -> dict[str, dict[str, float]]:
    """Each op's median ms and TFLOP/s on `stream` (the first call builds what it needs)."""
    rows = {}
    with torch.cuda.stream(stream):
        for name, (fn, work) in table.items():
            ms = timed_ms(fn, repeats)
            rows[name] = {"ms": round(ms, 3), "tflops": round(work / ms / 1e9, 1)}
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prefix", type=int, default=229376)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--free-sms", type=int, default=16)
    ap.add_argument("--decodes", type=int, default=32)
    ap.add_argument("--decode-keys", type=int, default=1536)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", default="", help="op names to time, comma-separated (default: all)")
    ap.add_argument("--out", type=Path, required=True)
    ns = ap.parse_args()
    device = torch.device("cuda")
    split = split_sms(device, ns.free_sms)
    table = ops(ns.chunk, ns.prefix, device, split.first_sms)
    if ns.only:
        table = {name: op for name, op in table.items() if name in ns.only.split(",")}
    result: dict = {
        "probe": "lane_ops", "command": "python -m benchmarks.probes.lane_ops " + " ".join(sys.argv[1:]),
        "date": datetime.now(UTC).isoformat(), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(), "lane_sms": split.rest_sms, "steps_sms": split.first_sms,
        "args": vars(ns) | {"out": str(ns.out)}, "settings": {},
    }  # fmt: skip

    def record(setting: str, rows: dict) -> None:
        result["settings"][setting] = rows
        print(setting, json.dumps(rows), flush=True)
        ns.out.write_text(json.dumps(result, indent=1))

    record("whole", time_ops(table, torch.cuda.current_stream(device), ns.repeats))
    record("rest_reused", time_ops(table, split.rest, ns.repeats))
    lane = ThreadPoolExecutor(max_workers=1)  # a fresh thread: cuDNN's graphs built on the lane's stream
    record("rest_own", lane.submit(time_ops, table, split.rest, ns.repeats).result())
    decode = as_graph(
        decode_lane(make_weights(device), ns.decodes, ns.decode_keys, split.first_sms, device), split.first
    )
    future = lane.submit(time_ops, table, split.rest, ns.repeats)
    num_decode_steps, t0 = 0, time.perf_counter()
    while not future.done():
        decode()
        split.first.synchronize()
        num_decode_steps += 1
    rows = future.result()
    rows["decode_steps"] = {
        "n": num_decode_steps,
        "mean_ms": round((time.perf_counter() - t0) / max(1, num_decode_steps) * 1e3, 3),
    }
    record("rest_beside", rows)
    lane.shutdown()


if __name__ == "__main__":
    main()
