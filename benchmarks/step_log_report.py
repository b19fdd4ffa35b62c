"""Which served steps the latency model mispredicts: measured / predicted over an engine's
step log (`--step-log FILE`, `engine/step_log.py`), by kind of step and prefix.

    python -m benchmarks.step_log_report STEPLOG [--skip-steps 16] [--worst 10] [--out OUT.json]

Groups (the prediction is the engine's own, uncorrected, from the profile it ran with):

    kind      decode      decodes only
              1 chunk     one prefill chunk (> 1 token), with or without decodes
              2+ chunks   several prefill chunks in one step
    prefix    the largest chunk's keys before it, in doubling buckets from 4K tokens
              (as online calibration keys them: latency/calibration.py, prefix_bucket)

Per group: steps, median and p95 of measured / predicted, and the share of steps over
1.5x; the same per execution path (`path`: decode graph, mixed graph, piecewise, eager;
steps with a chunk on cuDNN apart);
then the `--worst` steps by that ratio with their chunks (and, with eager attention, the
chunks on cuDNN and the Triton launch's splits); the host's time before each
submission (`host_s`: a long prompt's arrival shows here); the steps read late because the
launch of the step after them held the host (`held_back`, by that step's path). Last, the
chunk-step factor:
the median over every step with a chunk, which `mnemosyne simulate --chunk-step-factor` (and
`benchmarks.compare_serving_trace`) takes to replay other runs on this device under a
sustained serving load (an H200 then holds its power cap at lower clocks than the profile's
short bursts saw; decode-only steps, bandwidth-bound, stay at the profile's times); and the
idle-step factor, the same over the steps submitted with nothing in flight, divided by the
chunk-step factor (`--idle-step-factor`, applied on top of it: their host launches are not
hidden behind a step before them). Last, what `mnemosyne simulate --device-step-log` takes
from the same log (`mnemosyne/simulator/device_log.py`): the chunk factor per prefix bucket,
the idle-start steps' factor, and the spread of the decode-only steps it draws from. With a
prefill lane, its chunks and the steps beside them are left out of all of that and summed
up apart (`lane`).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from mnemosyne.engine.step_log import read_lane_log, read_step_log
from mnemosyne.latency.calibration import prefix_bucket
from mnemosyne.simulator.device_log import (
    CHUNK_BUCKET_TOKENS,
    PREFIX_BUCKET_TOKENS,
    SKIP_STEPS,
    DeviceLog,
    idle_starts,
)


def group_of(seqs: list[list[int]]) -> tuple[str, int]:
    """(kind, prefix bucket) of one step's [query tokens, keys before] list."""
    chunks = [(n, p) for n, p in seqs if n > 1]
    if not chunks:
        return "decode", 0
    kind = "1 chunk" if len(chunks) == 1 else "2+ chunks"
    return kind, prefix_bucket(max(p for _, p in chunks), PREFIX_BUCKET_TOKENS)


def bucket_label(bucket: int) -> str:
    if bucket == 0:
        return f"< {PREFIX_BUCKET_TOKENS // 1024}K"
    lo = PREFIX_BUCKET_TOKENS << (bucket - 1)
    return f"{lo // 1024}K-{2 * lo // 1024}K"


def report(steps: list[dict], worst: int) -> dict:
    ratios: dict[tuple[str, int], list[float]] = defaultdict(list)
    rows = []
    for s in steps:
        if s["predicted_s"] <= 0 or not s["seqs"]:
            continue
        r = s["measured_s"] / s["predicted_s"]
        ratios[group_of(s["seqs"])].append(r)
        rows.append((r, s))
    groups = []
    for (kind, bucket), rs in sorted(ratios.items()):
        rs.sort()
        groups.append({
            "kind": kind, "prefix": bucket_label(bucket) if kind != "decode" else "-", "steps": len(rs),
            "median_ratio": statistics.median(rs), "p95_ratio": rs[min(len(rs) - 1, int(0.95 * len(rs)))],
            "over_1.5x": sum(r > 1.5 for r in rs) / len(rs),
        })  # fmt: skip
    rows.sort(key=lambda x: -x[0])
    worst_rows = [
        {"ratio": r, "t_s": s["t_s"], "measured_ms": 1e3 * s["measured_s"], "predicted_ms": 1e3 * s["predicted_s"],
         "decodes": sum(1 for n, _ in s["seqs"] if n == 1), "chunks": [[n, p] for n, p in s["seqs"] if n > 1],
         **{k: s[k] for k in ("path", "cudnn_chunks", "chunk_splits") if k in s}}
        for r, s in rows[:worst]
    ]  # fmt: skip
    with_chunk = [(r, s) for r, s in rows if any(n > 1 for n, _ in s["seqs"])]
    factor = statistics.median(r for r, _ in with_chunk) if with_chunk else None
    # Steps submitted with nothing in flight, with a chunk: their launches are not hidden
    # behind a step before them (`device_log.idle_starts`).
    flags = idle_starts([s for _, s in rows])
    after_idle = [
        r for (r, s), idle in zip(rows, flags, strict=True) if idle and any(n > 1 for n, _ in s["seqs"])
    ]
    # Over the chunk-step factor: the simulator applies both to such a step.
    idle_factor = statistics.median(after_idle) / factor if after_idle and factor else None
    return {"num_steps": len(rows), "groups": groups, "paths": path_summary(rows), "worst": worst_rows,
            "chunk_step_factor": factor, "idle_step_factor": idle_factor, "num_idle_steps": len(after_idle),
            "host": host_summary(steps, worst), "held_back": held_back_summary(steps)}  # fmt: skip


def path_label(step: dict) -> str:
    """How a logged step ran: its `path`, with "+cudnn" when a chunk ran on cuDNN ("?": no path)."""
    return step.get("path", "?") + ("+cudnn" if step.get("cudnn_chunks") else "")


HELD_OVER = 1.3  # a step measured over this x its prediction ...
HELD_NEXT_UNDER = 0.5  # ... right before one under this x its own


def held_back_summary(steps: list[dict]) -> dict:
    """Steps whose result was read late because the launch of the step after it held the
    host (with async scheduling the engine reads step n after launching step n + 1). Such a
    run of host-bound launches shows as steps over HELD_OVER x their prediction ending in one
    under HELD_NEXT_UNDER x (its device work was mostly done when the step before it was
    read). Every step of the run is counted, by how the step after it ran (`path_label`)."""
    ratio = [s["measured_s"] / s["predicted_s"] if s["predicted_s"] > 0 else 1.0 for s in steps]
    by_next: dict[str, int] = defaultdict(int)
    for end in range(1, len(steps)):
        if ratio[end] >= HELD_NEXT_UNDER:
            continue
        i = end - 1
        while i >= 0 and ratio[i] > HELD_OVER:
            by_next[path_label(steps[i + 1])] += 1
            i -= 1
    return {"steps": sum(by_next.values()), "by_next_path": dict(sorted(by_next.items()))}


def path_summary(rows: list[tuple[float, dict]]) -> list[dict]:
    """Per execution path (`path_label`; logs written before `path` have none; a step with a
    chunk on cuDNN apart: its host work can make it host-bound): steps, median and
    share over 1.5x of measured / predicted."""
    by_path: dict[str, list[float]] = defaultdict(list)
    for r, s in rows:
        if "path" in s:
            by_path[path_label(s)].append(r)
    return [
        {"path": path, "steps": len(rs), "median_ratio": statistics.median(rs), "over_1.5x": sum(r > 1.5 for r in rs) / len(rs)}
        for path, rs in sorted(by_path.items())
    ]


def host_summary(steps: list[dict], worst: int) -> dict | None:
    """The host's time before each submission (`host_s`; logs written before it have none):
    p50 / p99 / max and the longest ones with the step they delayed."""
    timed = sorted((s for s in steps if s.get("host_s") is not None), key=lambda s: -s["host_s"])
    if not timed:
        return None
    values = sorted(s["host_s"] for s in timed)
    pick = lambda q: 1e3 * values[min(len(values) - 1, int(q * len(values)))]  # noqa: E731
    return {
        "steps": len(values), "p50_ms": pick(0.5), "p99_ms": pick(0.99), "max_ms": 1e3 * values[-1],
        "worst": [{"t_s": s["t_s"], "host_ms": 1e3 * s["host_s"], "chunks": [[n, p] for n, p in s["seqs"] if n > 1]}
                  for s in timed[:worst]],
    }  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("step_log", type=Path)
    ap.add_argument("--skip-steps", type=int, default=SKIP_STEPS, help="the first steps left out (warm-up)")
    ap.add_argument("--worst", type=int, default=10)
    ap.add_argument("--out", type=Path, default=None)
    ns = ap.parse_args(argv)
    header, steps = read_step_log(ns.step_log)
    result = {"step_log": str(ns.step_log), "header": header, **report(steps[ns.skip_steps :], ns.worst),
              "device_log": DeviceLog.from_steps(steps[ns.skip_steps :], str(ns.step_log)).summary()}  # fmt: skip
    print(f"{result['num_steps']} steps of {ns.step_log} ({header['device']}, layout {header['layout']})")
    print(
        f"{'kind':10s} {'prefix':>10s} {'steps':>6s} {'median':>7s} {'p95':>6s} {'>1.5x':>6s}   (measured / predicted)"
    )
    for g in result["groups"]:
        print(f"{g['kind']:10s} {g['prefix']:>10s} {g['steps']:6d} {g['median_ratio']:7.2f} {g['p95_ratio']:6.2f} "
              f"{100 * g['over_1.5x']:5.1f}%")  # fmt: skip
    for g in result["paths"]:
        print(f"path {g['path']:16s} {g['steps']:6d} steps, median {g['median_ratio']:.2f}, "
              f"{100 * g['over_1.5x']:.1f}% over 1.5x")  # fmt: skip
    print("worst steps:")
    for w in result["worst"]:
        how = f" [{w['path']}" if "path" in w else ""
        if "chunk_splits" in w:
            how += f", {w['cudnn_chunks']} on cuDNN, Triton splits {w['chunk_splits']}"
        print(f"  {w['ratio']:5.2f}x  {w['measured_ms']:7.1f} ms (predicted {w['predicted_ms']:.1f})  "
              f"at {w['t_s']:.1f} s: {w['decodes']} decodes, chunks {w['chunks']}{how + ']' if how else ''}")  # fmt: skip
    host = result["host"]
    if host is not None:
        at = f" (at {host['worst'][0]['t_s']:.1f} s)" if host["worst"] else ""
        print(f"host time before a submission: p50 {host['p50_ms']:.2f} ms, p99 {host['p99_ms']:.2f} ms, "
              f"max {host['max_ms']:.1f} ms{at}")  # fmt: skip
    held = result["held_back"]
    print(f"steps read late behind the next step's launch: {held['steps']} {held['by_next_path'] or ''}")
    if result["chunk_step_factor"] is not None:
        print(f"chunk-step factor (median over steps with a chunk): {result['chunk_step_factor']:.3f}")
    if result["idle_step_factor"] is not None:
        print(f"idle-step factor (median over {result['num_idle_steps']} steps started on an idle device, with a chunk, "
              f"over the chunk-step factor): "
              f"{result['idle_step_factor']:.3f}")  # fmt: skip
    dev = result["device_log"]
    factors = ", ".join(f"{bucket_label(int(b))} {f:.3f}" for b, f in dev["chunk_factors_by_prefix_bucket"].items())
    idle = "-" if dev["idle_factor"] is None else f"{dev['idle_factor']:.3f}"
    decodes = ", ".join(f"{n}: {' / '.join(f'{x:.3f}' for x in qs)}"
                        for n, qs in dev["decode_ratio_p10_p50_p90_by_decodes"].items())  # fmt: skip
    paths = ", ".join(f"{bucket_label(int(k.split('/')[0]))} {k.split('/')[1]} {f:.3f}"
                      for k, f in dev["chunk_factors_by_prefix_bucket_and_path"].items())  # fmt: skip
    sizes = ", ".join(f"{bucket_label(int(b))} {path} <={CHUNK_BUCKET_TOKENS << int(c)} {' / '.join(f'{x:.3f}' for x in qs)}"
                      for k, qs in dev["chunk_ratio_p10_p50_p90_by_prefix_bucket_path_and_chunk_bucket"].items()
                      for b, path, c in [k.split("/")])  # fmt: skip
    print(f"--device-step-log: chunk factors by prefix {factors}; by prefix and path {paths}; "
          f"beside decodes by prefix, path and chunk tokens (p10 / p50 / p90) {sizes}; idle-start {idle} "
          f"({dev['num_idle_steps']} steps); decode-only p10 / p50 / p90 by decodes {decodes} "
          f"({dev['num_decode_steps']} steps)")  # fmt: skip
    lane = lane_report(*read_lane_log(ns.step_log))
    if lane is not None:
        result["lane"] = lane
        print(f"prefill lane: {lane['chunks']} chunks, measured / predicted (alone) p50 {lane['chunk_ratio_p50']:.2f}; "
              f"{lane['steps_beside']} steps beside them (left out above): p50 / p99 / max "
              f"{lane['beside_p50_ms']:.1f} / {lane['beside_p99_ms']:.1f} / {lane['beside_max_ms']:.1f} ms")  # fmt: skip
    if ns.out is not None:
        ns.out.write_text(json.dumps(result, indent=1))
    return result


def lane_report(chunks: list[dict], beside: list[dict]) -> dict | None:
    """The prefill lane's chunks (measured / their prediction alone) and the steps that ran
    beside them (measured ms), all of them and by the SMs they were confined to
    (`by_steps_sms`: chunks leaving the steps that many SMs, steps run on them); None
    without a lane."""
    if not chunks and not beside:
        return None
    ratios = sorted(c["measured_s"] / c["predicted_s"] for c in chunks if c["predicted_s"] > 0)
    result = {"chunks": len(chunks), "chunk_ratio_p50": statistics.median(ratios) if ratios else 0.0,
              "steps_beside": len(beside), **_beside_ms(beside)}  # fmt: skip
    sms = sorted({c["steps_sms"] for c in chunks if "steps_sms" in c} | {s["steps_sms"] for s in beside if "steps_sms" in s})
    if sms:
        result["by_steps_sms"] = {
            str(n): {"chunks": sum(1 for c in chunks if c.get("steps_sms") == n),
                     "steps": sum(1 for s in beside if s.get("steps_sms") == n),
                     **_beside_ms([s for s in beside if s.get("steps_sms") == n])}
            for n in sms
        }  # fmt: skip
    timed = [c for c in chunks if "lane_timing" in c]
    if timed:
        result["timing"] = _lane_timing(timed)
    return result


def _lane_timing(chunks: list[dict]) -> dict:
    """Where the lane chunks' time went (`lane_timing`, `wire.plan.LaneChunkTiming`): the
    lane stream's time against the chunk's measured time, the lane thread's launching outside
    its waits for the device, and the chunks during which the caching allocator called
    cudaMalloc / cudaFree or retried (with their seqs)."""
    t = [c["lane_timing"] for c in chunks]
    device = sorted(x["device_s"] / c["measured_s"] for x, c in zip(t, chunks, strict=True) if c["measured_s"] > 0)
    active = sorted(1e3 * (x["launch_s"] - x["paced_s"]) for x in t)
    allocating = [
        {"t_s": c["t_s"], "seqs": c["seqs"], "allocs": x["num_device_allocs"], "frees": x["num_device_frees"],
         "retries": x["num_alloc_retries"], "measured_ms": 1e3 * c["measured_s"], "device_ms": 1e3 * x["device_s"]}
        for x, c in zip(t, chunks, strict=True)
        if x["num_device_allocs"] or x["num_device_frees"] or x["num_alloc_retries"]
    ]  # fmt: skip
    return {
        "device_over_measured_p50": statistics.median(device) if device else 0.0,
        "device_over_measured_min": device[0] if device else 0.0,
        "launch_active_ms_p50": statistics.median(active),
        "launch_active_ms_max": active[-1],
        "chunks_allocating": allocating,
    }


def _beside_ms(steps: list[dict]) -> dict:
    times = sorted(1e3 * s["measured_s"] for s in steps) or [0.0]
    return {
        "beside_p50_ms": statistics.median(times),
        "beside_p99_ms": times[min(len(times) - 1, int(0.99 * len(times)))],
        "beside_max_ms": times[-1],
    }


if __name__ == "__main__":
    main()
