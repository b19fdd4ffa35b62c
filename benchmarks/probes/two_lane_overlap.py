"""Two lanes on one GPU: decodes on a slice of the SMs while a long prompt's large chunks
run on the rest (CUDA green contexts), against the mixed batching the engine does today.

The question it answers: mixed batching holds every co-batched decode's token gap within
the TBT target by giving a long prompt small chunks, and a 30-ms step then spends ~12 ms on
the weights and the decodes and ~18 ms on the chunk: the 8B mixed scenario's long TTFT is
1.94x its floor. If the decodes ran beside the prefill instead of inside it, on their own
SMs, the prefill could take large chunks (its floor) and the decodes would keep their own
step time. This measures both sides of that trade on synthetic steps of the Llama-3-8B
shape (bf16, random weights, one H200):

    decode lane   D decodes of K keys: per layer the QKV / O / gate-up / down GEMMs over D rows
                  and the engine's split-KV decode kernel, then the LM head over D rows; one
                  CUDA graph per lane
    chunk lane    one chunk of c tokens after P keys: per layer the same GEMMs over c rows and
                  the prefix attention through cuDNN (GQA folded into the query length, as
                  `kernels/cudnn_prefill.py` does; the chunk's own c x c causal keys are left
                  out: c / P of the work)

and times, per SM split (decode SMs + the rest, `cuDevSmResourceSplitByCount`):
  - each lane alone on its own SMs, and on the whole GPU;
  - both at once: the decode steps' times while the chunk steps run, and the chunk steps' time;
  - with --whole-prompt N: one N-token prompt in chunk steps of --chunks[0] tokens (every key
    before a step's end unmasked), alone on the whole GPU, then beside the decode lane on each
    split: the prompt's time (a TTFT without the engine's host work) and the decode lane's
    token periods (its TBT);
  - with --decode-periods-ms: the together runs and the whole prompt again with each decode step
    starting no sooner than that period after the one before (0: back to back), the engine's
    question of whether pacing the steps beside a chunk to the TBT target speeds the chunk up
    (fewer weight reads a second beside it, at the power cap).

    python -m benchmarks.probes.two_lane_overlap --out OUT.json \
        [--decode-sms 16,24,32] [--chunks 2048] [--prefixes 131072,229376] [--decodes 32 --decode-keys 1536] \
        [--carveout] [--whole-prompt 262144 --prefixes ""] [--decode-periods-ms 0,27]

Measured on an H200 (benchmarks/results/README.md, "Twenty-second session"): a 256K-token
prompt in 4096-token steps beside 32 decodes on 16 SMs took 42.4 s (1.20x the 35.45-s floor
of the mixed scenario; 35.7 s alone) with token periods p50 / p99 / max 25.0 / 26.7 / 27.1 ms,
where the engine's mixed batching takes 68.9 s (1.94x) at p99 29.8 ms.

Needs `cuda-bindings` (the driver's green-context API) and a GPU; times from host clocks
around synchronised replays (each decode step alone is ~5 ms, so the ~20 us of a sync is
noise). A lane's whole-GPU figures are the baseline the engine's one-lane steps see. The
decode lane runs as a CUDA graph (one launch per step, as the engine's decode graphs); the
chunk lane eagerly (~10 launches a layer, queued ahead): two graphs replayed at once on two
streams faulted with an illegal address on torch 2.11 (either one beside eager work ran).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.probes.decode_kernel_options import random_batch
from mnemosyne.kernels.decode_attention import paged_decode_attention
from mnemosyne.kernels.decode_items import choose_split_budget, decode_workspace_items
from mnemosyne.worker.green_context import split_sms

# one cuDNN graph for every key count of BSHD inputs (as the engine sets it: kernels/cudnn_prefill.py)
os.environ.setdefault("TORCH_CUDNN_SDPA_AVOID_RECOMPILE", "1")

HIDDEN, INTER, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, NUM_LAYERS, VOCAB = 4096, 14336, 32, 8, 128, 32, 128256
GQA = NUM_HEADS // NUM_KV_HEADS


@dataclass
class Weights:
    layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]  # qkv, o, gate_up, down
    lm_head: torch.Tensor  # [HIDDEN, VOCAB]


def make_weights(device: torch.device) -> Weights:
    def w(k: int, n: int) -> torch.Tensor:
        return torch.randn(k, n, dtype=torch.bfloat16, device=device) * 0.02

    qkv = HIDDEN + 2 * NUM_KV_HEADS * HEAD_DIM
    layers = [
        (w(HIDDEN, qkv), w(HIDDEN, HIDDEN), w(HIDDEN, 2 * INTER), w(INTER, HIDDEN)) for _ in range(NUM_LAYERS)
    ]
    return Weights(layers, w(HIDDEN, VOCAB))


def mlp(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    h = x @ gate_up  # [n, 2 * INTER]
    return (F.silu(h[:, :INTER]) * h[:, INTER:]) @ down


def decode_lane(
    weights: Weights, num_decodes: int, keys: int, lane_sms: int, device: torch.device
) -> Callable[[], None]:
    """One decode step of `num_decodes` sequences of `keys` keys (the module docstring)."""
    query, k_cache, v_cache, meta, seq_ids = random_batch(
        [keys] * num_decodes, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, 64, False, device
    )
    budget = choose_split_budget(NUM_KV_HEADS, lane_sms, head_dim=HEAD_DIM)
    items = decode_workspace_items(num_decodes, budget)
    ws = (
        torch.empty(NUM_HEADS, items, HEAD_DIM, dtype=torch.float32, device=device),
        torch.empty(NUM_HEADS, items, dtype=torch.float32, device=device),
    )
    lse = torch.empty(num_decodes, NUM_HEADS, dtype=torch.float32, device=device)
    out = torch.empty_like(query)  # [D, H, hd]
    x0 = torch.randn(num_decodes, HIDDEN, dtype=torch.bfloat16, device=device)
    lengths = (meta.query_start_loc, meta.q_pos_start, meta.kv_start, meta.kv_lens, meta.block_tables)

    def step() -> None:
        x = x0
        for qkv_w, o_w, gu_w, d_w in weights.layers:
            q = (x @ qkv_w)[:, :HIDDEN].reshape(num_decodes, NUM_HEADS, HEAD_DIM)
            paged_decode_attention(
                q, k_cache, v_cache, *lengths, seq_ids, out, lse, HEAD_DIM**-0.5, None, budget, workspace=ws
            )
            x = x + out.reshape(num_decodes, HIDDEN) @ o_w
            x = x + mlp(x, gu_w, d_w)
        x @ weights.lm_head

    return step


def chunk_lane(weights: Weights, chunk: int, prefix: int, device: torch.device) -> Callable[[], None]:
    """One chunk of `chunk` tokens after `prefix` keys (the module docstring)."""
    k = torch.randn(1, NUM_KV_HEADS, prefix, HEAD_DIM, dtype=torch.bfloat16, device=device)
    v = torch.randn_like(k)
    x0 = torch.randn(chunk, HIDDEN, dtype=torch.bfloat16, device=device)

    def step() -> None:
        x = x0
        for qkv_w, o_w, gu_w, d_w in weights.layers:
            q = (x @ qkv_w)[:, :HIDDEN].reshape(chunk, NUM_KV_HEADS, GQA, HEAD_DIM)
            q = q.permute(1, 2, 0, 3).reshape(1, NUM_KV_HEADS, GQA * chunk, HEAD_DIM)  # GQA folded
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                o = F.scaled_dot_product_attention(q, k, v)  # [1, Hkv, G * c, hd]
            o = o.reshape(NUM_KV_HEADS, GQA, chunk, HEAD_DIM).permute(2, 0, 1, 3).reshape(chunk, HIDDEN)
            x = x + o @ o_w
            x = x + mlp(x, gu_w, d_w)
        x[-1:] @ weights.lm_head

    return step


def prompt_lane(
    weights: Weights, prompt_tokens: int, chunk: int, device: torch.device
) -> list[Callable[[], None]]:
    """A whole prompt's chunk steps: step i holds tokens [i c, (i + 1) c) and attends to every
    key before its end, unmasked (a causal mask would skip half of the chunk's own c x c
    block: c / (2 P) of the work). K / V live in one [1, N, Hkv, hd] (BSHD) buffer, read as
    strided views, as `kernels/cudnn_prefill.py` reads the cache's leading run of blocks."""
    k = torch.randn(1, prompt_tokens, NUM_KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device=device)
    v = torch.randn_like(k)
    x0 = torch.randn(chunk, HIDDEN, dtype=torch.bfloat16, device=device)

    def step_at(end: int) -> Callable[[], None]:
        c = min(chunk, end)
        keys, values = k[:, :end].transpose(1, 2), v[:, :end].transpose(1, 2)  # [1, Hkv, end, hd]

        def step() -> None:
            x = x0[:c]
            for qkv_w, o_w, gu_w, d_w in weights.layers:
                q = (x @ qkv_w)[:, :HIDDEN].reshape(c, NUM_KV_HEADS, GQA, HEAD_DIM)
                q = q.permute(2, 0, 1, 3).reshape(1, GQA * c, NUM_KV_HEADS, HEAD_DIM).transpose(1, 2)  # BSHD
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    o = F.scaled_dot_product_attention(q, keys, values)  # [1, Hkv, G * c, hd]
                o = o.reshape(NUM_KV_HEADS, GQA, c, HEAD_DIM).permute(2, 0, 1, 3).reshape(c, HIDDEN)
                x = x + o @ o_w
                x = x + mlp(x, gu_w, d_w)
            x[-1:] @ weights.lm_head

        return step

    return [step_at(min(end, prompt_tokens)) for end in range(chunk, prompt_tokens + chunk, chunk)]


def time_prompt(
    decode: Callable[[], None] | None,
    ds: torch.cuda.Stream | None,
    steps: list[Callable[[], None]],
    cs: torch.cuda.Stream,
    launcher: ThreadPoolExecutor,
    period_s: float = 0.0,
) -> tuple[list[float], float]:
    """(the decode lane's token periods while the prompt ran, the prompt's seconds). The
    chunk steps are launched from a thread of their own: launched from the decode lane's
    thread, a chunk step's launch held that thread for about one chunk step (0.6-1.1 s token
    periods: the eager cuDNN / GEMM launches wait on the device, and one thread then feeds
    neither lane), so an engine would give each lane its own launching thread too. The
    periods run completion to completion. `launcher` is one long-lived thread, the one the
    steps were warmed up on: torch keeps cuDNN's attention graphs per thread, so a fresh
    thread would build them again mid-run. `period_s`: each decode step starts no sooner than
    that after the one before (`pace`)."""
    done = threading.Event()

    def feed() -> None:
        for step in steps:
            step()
        cs.synchronize()
        done.set()

    periods: list[float] = []
    last_done = None
    t_start = time.perf_counter()
    feeder = launcher.submit(feed)
    last_start = 0.0
    while decode is not None and not done.is_set():
        last_start = pace(last_start, period_s)
        decode()
        ds.synchronize()
        now = time.perf_counter()
        if last_done is not None and not done.is_set():
            periods.append(now - last_done)
        last_done = now
    feeder.result()
    return periods, time.perf_counter() - t_start


def pace(last_start: float, period_s: float) -> float:
    """Sleep until `period_s` after `last_start` (perf_counter seconds); the new start."""
    wait_s = last_start + period_s - time.perf_counter()
    if wait_s > 0:
        time.sleep(wait_s)
    return time.perf_counter()


def green_streams(
    device: torch.device, decode_sms: int
) -> tuple[torch.cuda.Stream, torch.cuda.Stream, int, int]:
    """(decode stream, chunk stream, their SM counts): two green contexts on disjoint SMs."""
    split = split_sms(device, decode_sms)
    return split.first, split.rest, split.first_sms, split.rest_sms


def eager_on(step: Callable[[], None], stream: torch.cuda.Stream) -> Callable[[], None]:
    """`step` launched eagerly on `stream` (warmed up once)."""

    def run() -> None:
        with torch.cuda.stream(stream):
            step()

    run()
    stream.synchronize()
    return run


def eager_on_lazy(step: Callable[[], None], stream: torch.cuda.Stream) -> Callable[[], None]:
    """`step` launched eagerly on `stream` (no warm-up: for steps of one warmed-up kind)."""

    def run() -> None:
        with torch.cuda.stream(stream):
            step()

    return run


def as_graph(step: Callable[[], None], stream: torch.cuda.Stream) -> Callable[[], None]:
    """`step` captured as a CUDA graph on `stream` (replayed there); eager if capture fails."""
    with torch.cuda.stream(stream):
        step()  # compiles, cuDNN plans
    stream.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, stream=stream):
            step()
    except RuntimeError as e:
        print(f"capture failed ({str(e)[:120]}): eager", flush=True)

        def eager() -> None:
            with torch.cuda.stream(stream):
                step()

        return eager

    def replay() -> None:
        with torch.cuda.stream(stream):
            graph.replay()

    return replay


def with_carveout(step: Callable[[], None], num_sms: int) -> Callable[[], None]:
    """`step` with cuBLAS sizing its GEMMs' grids for the device less `num_sms` SMs (torch's
    experimental carveout; 0: unchanged). Read at each GEMM's launch, so set around it."""
    if num_sms == 0:
        return step

    def run() -> None:
        torch._C._set_sm_carveout_experimental(num_sms)
        try:
            step()
        finally:
            torch._C._set_sm_carveout_experimental(None)

    return run


def time_alone(run: Callable[[], None], stream: torch.cuda.Stream, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        stream.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def time_together(
    decode: Callable[[], None],
    ds: torch.cuda.Stream,
    chunk: Callable[[], None],
    cs: torch.cuda.Stream,
    num_chunks: int,
    period_s: float = 0.0,
) -> tuple[list[float], float]:
    """(decode step times while the chunk steps ran, seconds per chunk step); each decode step
    starts no sooner than `period_s` after the one before."""
    decode_s: list[float] = []
    t_start = time.perf_counter()
    for _ in range(num_chunks):
        chunk()
    t0 = 0.0
    while not cs.query():
        t0 = pace(t0, period_s)
        decode()
        ds.synchronize()
        if not cs.query():  # finished beside a chunk step (the last may end alone)
            decode_s.append(time.perf_counter() - t0)
    cs.synchronize()
    return decode_s, (time.perf_counter() - t_start) / num_chunks


def summary(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    pick = lambda q: xs[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731
    return {"n": len(xs), "p50_ms": round(statistics.median(xs) * 1e3, 3), "p99_ms": round(pick(0.99) * 1e3, 3),
            "max_ms": round(xs[-1] * 1e3, 3), "over_30ms": sum(x > 0.030 for x in xs),
            "over_45ms": sum(x > 0.045 for x in xs), "top5_ms": [round(x * 1e3, 1) for x in xs[-5:]]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--decode-sms", default="16,24,32")
    ap.add_argument("--chunks", default="2048", help="c,... (chunk tokens)")
    ap.add_argument(
        "--carveout",
        action="store_true",
        help="also run the chunk lane with cuBLAS told to leave the decode lane's SMs out",
    )
    ap.add_argument(
        "--priority-stream",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run the decode lane on a high-priority stream, SMs not partitioned",
    )
    ap.add_argument(
        "--unrestricted-decodes",
        action="store_true",
        help="also run each split with the decode lane on a plain stream (all SMs) and only the chunk lane "
        "confined to its green context (rows with decode_sms = the GPU's SM count)",
    )
    ap.add_argument("--prefixes", default="131072,229376")
    ap.add_argument("--decodes", type=int, default=32)
    ap.add_argument("--decode-keys", type=int, default=1536)
    ap.add_argument(
        "--whole-prompt",
        type=int,
        default=0,
        help="N > 0: also run one N-token prompt in --chunks[0]-token steps, alone and beside decodes",
    )
    ap.add_argument("--num-chunks", type=int, default=3, help="chunk steps per together-run")
    ap.add_argument(
        "--decode-periods-ms",
        default="0",
        help="p,...: decode steps start at least p ms apart in the together runs and the whole prompt (0: back to back)",
    )
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    weights = make_weights(device)
    result: dict = {
        "command": "python -m benchmarks.probes.two_lane_overlap " + " ".join(sys.argv[1:]),
        "device": props.name, "num_sms": props.multi_processor_count, "date": time.strftime("%Y-%m-%d"),
        "shape": "llama3-8b (bf16, random)", "runs": [],
    }  # fmt: skip
    full = torch.cuda.Stream(device)
    carveouts = args.carveout and hasattr(torch._C, "_set_sm_carveout_experimental")
    result["cublas_sm_carveout_available"] = hasattr(torch._C, "_set_sm_carveout_experimental")
    lanes = [green_streams(device, want) for want in map(int, args.decode_sms.split(","))]
    if args.unrestricted_decodes:
        lanes += [
            (torch.cuda.Stream(device), cs, props.multi_processor_count, c_sms) for _, cs, _, c_sms in lanes
        ]
    decodes = {props.multi_processor_count: None} | {d_sms: None for _, _, d_sms, _ in lanes}
    prefixes = [int(p) for p in args.prefixes.split(",") if p]
    periods_s = [float(p) / 1e3 for p in args.decode_periods_ms.split(",")]
    for prefix, chunk_tokens in itertools.product(prefixes, map(int, args.chunks.split(","))):
        chunk_step = chunk_lane(weights, chunk_tokens, prefix, device)
        chunk_full = eager_on(chunk_step, full)
        if decodes[props.multi_processor_count] is None:
            decodes[props.multi_processor_count] = as_graph(
                decode_lane(weights, args.decodes, args.decode_keys, props.multi_processor_count, device),
                full,
            )
        base = {"prefix": prefix, "chunk": chunk_tokens,
                "decode_alone_whole_gpu": summary(time_alone(decodes[props.multi_processor_count], full, 30)),
                "chunk_alone_whole_gpu": summary(time_alone(chunk_full, full, 3))}  # fmt: skip
        print(json.dumps(base), flush=True)
        result["runs"].append(base)
        for ds, cs, d_sms, c_sms in lanes:
            if decodes[d_sms] is None:
                decodes[d_sms] = as_graph(
                    decode_lane(weights, args.decodes, args.decode_keys, d_sms, device), ds
                )
            decode = decodes[d_sms]
            carveouts_here = sorted({0, props.multi_processor_count - c_sms if carveouts else 0})
            for carveout, period_s in itertools.product(carveouts_here, periods_s):
                chunk = eager_on(with_carveout(chunk_step, carveout), cs)
                decode_together, chunk_s = time_together(decode, ds, chunk, cs, args.num_chunks, period_s)
                row = {"prefix": prefix, "chunk": chunk_tokens, "decode_sms": d_sms, "chunk_sms": c_sms,
                       "cublas_sm_carveout": carveout, "decode_period_ms": period_s * 1e3,
                       "decode_alone": summary(time_alone(decode, ds, 30)),
                       "chunk_alone": summary(time_alone(chunk, cs, 3)),
                       "decode_together": summary(decode_together), "chunk_together_ms": round(chunk_s * 1e3, 2)}  # fmt: skip
                print(json.dumps(row), flush=True)
                result["runs"].append(row)
                args.out.write_text(json.dumps(result, indent=1))
        if args.priority_stream:  # no partition: the decode lane on a high-priority stream
            hi = torch.cuda.Stream(device, priority=-1)
            decode_hi = as_graph(
                decode_lane(weights, args.decodes, args.decode_keys, props.multi_processor_count, device), hi
            )
            decode_together, chunk_s = time_together(decode_hi, hi, chunk_full, full, args.num_chunks)
            row = {"prefix": prefix, "chunk": chunk_tokens, "decode_sms": "all (priority stream)",
                   "decode_together": summary(decode_together), "chunk_together_ms": round(chunk_s * 1e3, 2)}  # fmt: skip
            print(json.dumps(row), flush=True)
            result["runs"].append(row)
        args.out.write_text(json.dumps(result, indent=1))
    if args.whole_prompt:
        chunk_tokens = int(args.chunks.split(",")[0])
        steps = prompt_lane(weights, args.whole_prompt, chunk_tokens, device)
        launcher = ThreadPoolExecutor(max_workers=1)
        # cuDNN's graphs (one per power-of-two bucket of key counts), built on the launching
        # thread before the timed runs, as the engine builds them at start-up
        warm = [s for i, s in enumerate(steps) if not (i + 1) & i or i == len(steps) - 1]
        for stream in [full] + [cs for _, cs, _, _ in lanes]:
            launcher.submit(lambda stream=stream: [eager_on_lazy(s, stream)() for s in warm]).result()
            stream.synchronize()
        _, alone_s = time_prompt(None, None, [eager_on_lazy(s, full) for s in steps], full, launcher)
        row = {
            "whole_prompt": args.whole_prompt,
            "chunk": chunk_tokens,
            "prompt_alone_whole_gpu_s": round(alone_s, 3),
        }
        print(json.dumps(row), flush=True)
        result["runs"].append(row)
        for (ds, cs, d_sms, c_sms), period_s in itertools.product(lanes, periods_s):
            if decodes[d_sms] is None:
                decodes[d_sms] = as_graph(
                    decode_lane(weights, args.decodes, args.decode_keys, d_sms, device), ds
                )
            periods, prompt_s = time_prompt(
                decodes[d_sms], ds, [eager_on_lazy(s, cs) for s in steps], cs, launcher, period_s
            )
            row = {"whole_prompt": args.whole_prompt, "chunk": chunk_tokens, "decode_sms": d_sms, "chunk_sms": c_sms,
                   "decode_period_ms": period_s * 1e3, "prompt_s": round(prompt_s, 3), "prompt_vs_alone": round(prompt_s / alone_s, 4),
                   "decode_periods": summary(periods)}  # fmt: skip
            print(json.dumps(row), flush=True)
            result["runs"].append(row)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
