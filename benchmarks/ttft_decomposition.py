"""Where each short request's TTFT went, in a measured serving run and (optionally) in the
simulator on the same trace, request by request.

    python -m benchmarks.ttft_decomposition RUN_DIR [--config lars_adaptive] [--out OUT.json] \
        [--simulate "SIMULATOR FLAGS" [--latency-profile P]]

RUN_DIR is a `benchmarks.serving_trace --step-logs` output (serving_trace.json, runs/C.bench.json[.gz],
runs/C.steps.jsonl.gz). Bench records are in trace order, so request i is the simulator's
"req-i". Per short request (engine clock)::

    steps     the steps that prefilled it: its chunks [tokens, keys before] chained from its
              last one (keys before + tokens = its prompt) back to keys before = 0, searched
              after its arrival
    wait      its first step's start (result - measured_s) - its arrival
    span      its last step's result - its first step's start
    delivery  the client's first token - its last step's result

The client's clock (bench `start_time`) is put on the engine's by the smallest (client first
token - last step's result) over the short requests, i.e. the fastest first token took no
time to reach the client, so `wait` is an upper bound and `delivery` a lower one. Free of
that assumption: `outside` = TTFT - span of the requests served by one step started on an
idle engine (`idle_start`): the time of a request outside the engine's steps (the server's
HTTP path and the engine core's input, the first token's way back). Its median is what
`mnemosyne simulate --arrival-delay-ms` takes.

With --simulate, its one string holds `benchmarks.simulate_serving_trace`'s own flags (--gpu,
--kv-cache-memory-gb, --device-latency-profile, the step factors, --device-step-log,
--arrival-delay-ms): the simulator runs the run's trace and configuration and each request's
simulated wait (its first step's start on the device - arrival) and span are set beside the
measured ones. Short requests are split at --mode-split-ms (measured TTFT): under load their
TTFTs are bimodal (served at once, or beside a long prefill), and a median over all of them
falls between the modes, so the table gives each mode's paired medians.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import tempfile
from pathlib import Path

from benchmarks.serving_trace_data import read_bench
from mnemosyne.engine.step_log import read_step_log


def chain(steps: list[dict], prompt_len: int, after_s: float) -> list[int] | None:
    """Indices of the steps that prefilled a prompt of `prompt_len` tokens, in order: the first
    step with a chunk ending at the prompt's end whose result is after `after_s`, then back
    through chunks ending where the later one starts."""
    last = next(
        (i for i, s in enumerate(steps)
         if s["t_s"] > after_s and any(n > 1 and p + n == prompt_len for n, p in s["seqs"])),
        None,
    )  # fmt: skip
    if last is None:
        return None
    out, end, i = [], prompt_len, last
    while end > 0:
        while i >= 0 and not any(n > 1 and p + n == end for n, p in steps[i]["seqs"]):
            i -= 1
        if i < 0 or steps[i]["t_s"] < after_s:
            return None
        out.append(i)
        end = next(p for n, p in steps[i]["seqs"] if n > 1 and p + n == end)
        i -= 1
    return out[::-1]


def measured_rows(run_dir: Path, config: str) -> tuple[list[dict], dict]:
    trace = json.loads((run_dir / "serving_trace.json").read_text())["results"][config]["requests"]
    bench = read_bench(run_dir / "runs" / f"{config}.bench.json")["requests"]
    _, steps = read_step_log(run_dir / "runs" / f"{config}.steps.jsonl.gz")
    # A first alignment from the requests whose whole prompt ran in one idle-start step
    # (unambiguous), then every short request's chain searched after its arrival.
    idle_one = {
        s["seqs"][0][0]: s
        for s in steps
        if s.get("idle_start") and len(s["seqs"]) == 1 and s["seqs"][0][1] == 0
    }
    rough = [b["start_time"] + b["ttft_s"] - idle_one[b["prompt_len"]]["t_s"]
             for b, t in zip(bench, trace, strict=True) if t["kind"] == "short" and b["prompt_len"] in idle_one]  # fmt: skip
    if not rough:
        raise SystemExit(f"{run_dir}: no request served by one idle-start step to align the clocks")
    rough_offset = statistics.median(rough)
    rows = []
    for i, (b, t) in enumerate(zip(bench, trace, strict=True)):
        if t["kind"] != "short" or not b["success"]:
            continue
        idx = chain(steps, b["prompt_len"], b["start_time"] - rough_offset - 0.05)
        if idx is not None:
            rows.append({"i": i, "prompt_len": b["prompt_len"], "ttft_s": b["ttft_s"], "start": b["start_time"],
                         "steps": [steps[k] for k in idx]})  # fmt: skip
    offset = min(r["start"] + r["ttft_s"] - r["steps"][-1]["t_s"] for r in rows)
    outside = []
    for r in rows:
        first, last = r["steps"][0], r["steps"][-1]
        start_s = first["t_s"] - first["measured_s"]
        r.update(
            arrival_s=r.pop("start") - offset, span_s=last["t_s"] - start_s,
            num_steps=len(r["steps"]), idle_start=bool(first.get("idle_start")),
            measured_s=sum(s["measured_s"] for s in r["steps"]), predicted_s=sum(s["predicted_s"] for s in r["steps"]),
        )  # fmt: skip
        r["wait_s"] = start_s - r["arrival_s"]
        r["delivery_s"] = r["ttft_s"] - r["wait_s"] - r["span_s"]
        if r["idle_start"] and r["num_steps"] == 1:
            outside.append(r["ttft_s"] - r["span_s"])
        del r["steps"]
    summary = {
        "num_short_matched": len(rows), "num_short": sum(1 for t in trace if t["kind"] == "short"),
        "outside_ms_median": 1e3 * statistics.median(outside) if outside else None,
        "outside_ms_p10_p90": [1e3 * _q(outside, 0.1), 1e3 * _q(outside, 0.9)] if outside else None,
        "num_outside": len(outside),
        "wait_ms_median_idle_one_step": 1e3 * statistics.median(
            [r["wait_s"] for r in rows if r["idle_start"] and r["num_steps"] == 1] or [0.0]),
        "delivery_ms_median": 1e3 * statistics.median(r["delivery_s"] for r in rows),
    }  # fmt: skip
    return rows, summary


def _q(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


def simulated_rows(
    measured_json: Path, config: str, flags: list[str], latency_profile: str | None
) -> dict[int, dict]:
    """Run the simulator on the measured run's trace and configuration (record_steps): per
    request index, its TTFT, wait (first step's start on the device - arrival) and span.
    `latency_profile`: the server's (default: the one in the measured run's command)."""
    from benchmarks import serving_trace
    from benchmarks.compare_serving_trace import trace_argv
    from benchmarks.simulate_serving_trace import simulate_argv
    from mnemosyne.bench.long_context.run import write_model_dir
    from mnemosyne.cli import build_parser, parse_args
    from mnemosyne.simulator.command import add_step_factor_args, run_simulation

    own_ap = argparse.ArgumentParser()
    own_ap.add_argument("--gpu", default="h200")
    own_ap.add_argument("--kv-cache-memory-gb", type=float, default=None)
    own_ap.add_argument("--device-latency-profile", default=None)
    add_step_factor_args(own_ap)
    own = own_ap.parse_args(flags)
    measured = json.loads(measured_json.read_text())
    rest = [*trace_argv(measured), "--configs", config]
    words = shlex.split(
        measured["command"][0] if isinstance(measured["command"], list) else measured["command"]
    )
    if latency_profile is None and "--latency-profile" in words:  # the profile the server ran with
        latency_profile = words[words.index("--latency-profile") + 1]
    if latency_profile is None:
        raise SystemExit(f"{measured_json}: its command names no --latency-profile; give the server's")
    rest += ["--latency-profile", latency_profile]
    with tempfile.TemporaryDirectory() as tmp:
        ns = serving_trace.parse_args([*rest, "--dry-run", "--out", tmp])
        serving_trace.main([*rest, "--dry-run", "--out", tmp])
        model_dir = write_model_dir(serving_trace.SHAPE_NAMES[ns.shape], Path(tmp))
        argv = simulate_argv(ns, own, config, model_dir, Path(tmp) / "trace.jsonl")
        engine, _ = run_simulation(parse_args(build_parser(), argv), record_steps=True)
    first: dict[str, tuple[float, float]] = {}  # request -> (submit, previous step's done)
    prev_done = 0.0
    for step in engine.steps or []:
        for rid, start, _ in step.chunks:
            if start == 0 and rid not in first:
                first[rid] = (step.submit_s, prev_done)
        prev_done = step.done_s
    out = {}
    for rid, r in engine.requests.items():
        if not r.token_times_s or rid not in first:
            continue
        start_s = max(first[rid])
        out[int(rid.removeprefix("req-"))] = {
            "ttft_s": r.token_times_s[0] - r.arrival_s, "wait_s": start_s - r.arrival_s,
            "span_s": r.token_times_s[0] - start_s,
        }  # fmt: skip
    return out


def mode_summary(rows: list[dict], split_s: float) -> dict:
    out = {}
    for mode, keep in (("fast", lambda r: r["ttft_s"] < split_s), ("slow", lambda r: r["ttft_s"] >= split_s)):
        sel = [r for r in rows if keep(r)]
        if not sel:
            continue
        m = {"n": len(sel), "measured_ttft_ms_median": 1e3 * statistics.median(r["ttft_s"] for r in sel)}
        if all("sim" in r for r in sel):
            m["simulated_ttft_ms_median"] = 1e3 * statistics.median(r["sim"]["ttft_s"] for r in sel)
            m["sim_over_measured_median"] = statistics.median(r["sim"]["ttft_s"] / r["ttft_s"] for r in sel)
            m["num_simulated_under_split"] = sum(r["sim"]["ttft_s"] < split_s for r in sel)
        out[mode] = m
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--config", default="lars_adaptive")
    ap.add_argument("--mode-split-ms", type=float, default=150.0)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--latency-profile", default=None, help="the server's (default: the run's command's)")
    ap.add_argument("--simulate", default=None, help='the simulator\'s flags, one string ("" for none)')
    ns = ap.parse_args(argv)
    rows, summary = measured_rows(ns.run_dir, ns.config)
    if ns.simulate is not None:
        sim = simulated_rows(
            ns.run_dir / "serving_trace.json", ns.config, shlex.split(ns.simulate), ns.latency_profile
        )
        for r in rows:
            if r["i"] in sim:
                r["sim"] = sim[r["i"]]
    summary["modes"] = mode_summary(rows, ns.mode_split_ms / 1e3)
    print(
        f"{ns.run_dir} {ns.config}: {summary['num_short_matched']} of {summary['num_short']} short requests matched"
    )
    print(
        "   i  arrival_s  prompt | meas ttft  wait  steps (n: meas / pred)  deliv |  sim ttft  wait  span   (ms)"
    )
    for r in rows:
        line = (f"{r['i']:4d} {r['arrival_s']:9.2f} {r['prompt_len']:7d} | {1e3 * r['ttft_s']:8.1f} {1e3 * r['wait_s']:5.1f} "
                f"{r['num_steps']:3d}: {1e3 * r['measured_s']:6.1f} / {1e3 * r['predicted_s']:6.1f}"
                f"{' idle' if r['idle_start'] else '     '} {1e3 * r['delivery_s']:5.2f}")  # fmt: skip
        if "sim" in r:
            s = r["sim"]
            line += f" | {1e3 * s['ttft_s']:8.1f} {1e3 * s['wait_s']:5.1f} {1e3 * s['span_s']:6.1f}"
        print(line)
    print(f"outside the steps (TTFT - span, {summary['num_outside']} requests served by one idle-start step): "
          f"median {summary['outside_ms_median']:.2f} ms, p10 / p90 {summary['outside_ms_p10_p90']} ms; "
          f"aligned: wait {summary['wait_ms_median_idle_one_step']:.2f} ms, delivery "
          f"{summary['delivery_ms_median']:.2f} ms (medians)")  # fmt: skip
    for mode, m in summary["modes"].items():
        print(
            f"{mode} (measured TTFT {'<' if mode == 'fast' else '>='} {ns.mode_split_ms:.0f} ms): {json.dumps(m)}"
        )
    result = {"run_dir": str(ns.run_dir), "config": ns.config, "command": "python -m benchmarks.ttft_decomposition "
              + shlex.join(argv or []), "summary": summary, "requests": rows}  # fmt: skip
    if ns.out is not None:
        ns.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
