"""Which SMs each green-context split gives, and whether a CUDA graph replayed on a split's
stream stays on its SMs (worker/prefill_lane.py relies on both).

    for each S in --steps-sms:  split_sms(device, S) -> first(S), rest(S)
      SM ids:  a Triton kernel of many programs records %smid per program on each stream
      copies:  a memory-bound copy (--copy-mb MB) per call: eager on first(S); a graph
               captured on a plain stream, replayed on the plain stream, first(S) and rest(S);
               a graph captured on first(S), replayed there

Writes one JSON: per S, the SM ids of first and rest, whether first(S) is inside first(S')
for every larger S', whether first and rest are disjoint, and the replay times.

    python -m benchmarks.probes.green_context_sms --steps-sms 16,24,32 --out sms.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch
import triton
import triton.language as tl

from mnemosyne.worker.green_context import split_sms


@triton.jit
def _smid_kernel(out_ptr, spin):
    pid = tl.program_id(0)
    smid = tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)
    acc = pid * 0
    for i in range(spin):  # keep the program resident a while, so the grid spreads over every SM it may use
        acc += i
    tl.store(out_ptr + pid, smid + acc * 0)


def sm_ids(stream: torch.cuda.Stream, num_programs: int) -> list[int]:
    out = torch.full((num_programs,), -1, dtype=torch.int32, device="cuda")
    with torch.cuda.stream(stream):
        _smid_kernel[(num_programs,)](out, 20000)
    stream.synchronize()
    return sorted(set(out.tolist()))


def call_ms(fn: Callable[[], object], stream: torch.cuda.Stream, reps: int) -> float:
    with torch.cuda.stream(stream):
        fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def captured(fn: Callable[[], object], stream: torch.cuda.Stream | None) -> torch.cuda.CUDAGraph:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        fn()
    return graph


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps-sms", default="16,24,32")
    ap.add_argument("--copy-mb", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", type=Path, required=True)
    ns = ap.parse_args()
    device = torch.device("cuda")
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    plain = torch.cuda.Stream()
    src = torch.empty(ns.copy_mb << 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy = lambda: dst.copy_(src)  # noqa: E731
    graph = captured(copy, None)
    floor_ms = 2 * src.numel() / 4.2e12 * 1e3
    result: dict = {"device": torch.cuda.get_device_name(device), "num_sms": num_sms, "copy_mb": ns.copy_mb,
                    "copy_floor_ms_at_4.2TBps": floor_ms, "plain_replay_ms": call_ms(graph.replay, plain, ns.reps),
                    "all_sm_ids": len(sm_ids(plain, 64 * num_sms)), "splits": {}}  # fmt: skip
    firsts: dict[int, set[int]] = {}
    for steps_sms in (int(x) for x in ns.steps_sms.split(",")):
        split = split_sms(device, steps_sms)
        first, rest = sm_ids(split.first, 64 * num_sms), sm_ids(split.rest, 64 * num_sms)
        firsts[steps_sms] = set(first)
        result["splits"][str(steps_sms)] = {
            "first_sms": split.first_sms, "rest_sms": split.rest_sms,
            "first_ids": first, "rest_ids": rest, "disjoint": not set(first) & set(rest),
            "first_eager_ms": call_ms(copy, split.first, ns.reps),
            "first_replay_ms": call_ms(graph.replay, split.first, ns.reps),
            "rest_replay_ms": call_ms(graph.replay, split.rest, ns.reps),
            "first_captured_replay_ms": call_ms(captured(copy, split.first).replay, split.first, ns.reps),
        }  # fmt: skip
    sizes = sorted(firsts)
    result["nested"] = all(firsts[a] <= firsts[b] for a, b in zip(sizes, sizes[1:], strict=False))
    ns.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "splits"}))
    for k, v in result["splits"].items():
        print(k, {x: y for x, y in v.items() if not x.endswith("_ids")}, "first ids", v["first_ids"][:40])


if __name__ == "__main__":
    main()
