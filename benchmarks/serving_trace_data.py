"""The serving-trace benchmark's data: the trace (Poisson arrivals of short and long requests),
its JSONL for `bench serve`, the TTFT deadlines and the per-configuration analysis of a run.
See benchmarks/serving_trace.py."""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

TBT_LEVELS = [*np.linspace(0.0, 99.0, 100), *np.linspace(99.1, 100.0, 10)]  # percentiles kept for CDFs


@dataclass(frozen=True)
class TraceSpec:
    """What the trace is drawn from (lengths in tokens, inclusive ranges; times in seconds)."""

    duration_s: float
    rate_per_s: float
    long_fraction: float
    short_prompt: tuple[int, int]
    short_output: tuple[int, int]
    long_prompt: tuple[int, int]
    long_output: tuple[int, int]
    seed: int

    def check_integrity(self) -> None:
        if not (self.duration_s > 0 and self.rate_per_s > 0 and 0.0 <= self.long_fraction <= 1.0):
            raise ValueError(f"need duration_s > 0, rate_per_s > 0 and 0 <= long_fraction <= 1: {self}")
        for name in ("short_prompt", "short_output", "long_prompt", "long_output"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} must be a range 1 <= lo <= hi, got {lo},{hi}")

    @property
    def max_total_len(self) -> int:
        """The longest prompt + output any request of the trace may need."""
        return max(self.short_prompt[1] + self.short_output[1], self.long_prompt[1] + self.long_output[1])


def make_trace(spec: TraceSpec) -> list[dict]:
    """The requests' arrival_s, kind ("short" | "long"), prompt_len and output_len, by arrival."""
    spec.check_integrity()
    rng = np.random.default_rng(spec.seed)
    arrivals: list[float] = []
    t = float(rng.exponential(1.0 / spec.rate_per_s))
    while t < spec.duration_s:
        arrivals.append(t)
        t += float(rng.exponential(1.0 / spec.rate_per_s))
    if not arrivals:
        arrivals = [0.0]
    n = len(arrivals)
    num_long = max(1, round(spec.long_fraction * n)) if spec.long_fraction > 0 else 0
    is_long = np.zeros(n, dtype=bool)
    is_long[rng.choice(n, size=min(num_long, n), replace=False)] = True
    trace = []
    for t, long in zip(arrivals, is_long, strict=True):
        prompt, output = (
            (spec.long_prompt, spec.long_output) if long else (spec.short_prompt, spec.short_output)
        )
        trace.append({
            "arrival_s": round(t, 4), "kind": "long" if long else "short",
            "prompt_len": int(rng.integers(prompt[0], prompt[1] + 1)),
            "output_len": int(rng.integers(output[0], output[1] + 1)),
        })  # fmt: skip
    return trace


def write_trace(trace: list[dict], path: Path, vocab_size: int, seed: int) -> None:
    """The trace as `bench serve` JSONL: random token ids (from 1000 up, or vocab/4 on tiny vocabularies)."""
    rng = np.random.default_rng(seed + 1)
    low = min(1000, vocab_size // 4)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for req in trace:
            prompt = rng.integers(low, vocab_size, size=req["prompt_len"]).tolist()
            f.write(
                json.dumps({"prompt": prompt, **{k: v for k, v in req.items() if k != "prompt_len"}}) + "\n"
            )


def trace_id(spec: TraceSpec, trace: list[dict]) -> str:
    """A short hash naming the trace: runs are merged only with runs of the same trace."""
    return hashlib.sha256(json.dumps([asdict(spec), trace]).encode()).hexdigest()[:12]


def ttft_deadlines_s(
    model_dir: Path, trace: list[dict], factor: float, min_s: float
) -> list[tuple[float, float]]:
    """(prefill floor, deadline) per request: deadline = max(factor x floor, min_s), in seconds."""
    from mnemosyne.bench.long_context.engine import chunk_floor_s

    cfg = _bf16_config(model_dir)
    floors = [chunk_floor_s(cfg, r["prompt_len"], 0) for r in trace]  # one chunk: the whole causal prefill
    return [(f, max(factor * f, min_s)) for f in floors]


def decode_step_floor_s(model_dir: Path, num_seqs: int, context_len: int) -> float:
    """A decode step of `num_seqs` requests at `context_len` tokens each: (weights + KV bytes) / 4.2 TB/s."""
    from mnemosyne.bench.long_context.engine import decode_floor_s

    return decode_floor_s(_bf16_config(model_dir), num_seqs * context_len)


def floors_summary(
    model_dir: Path, spec: TraceSpec, trace: list[dict], prefill_floors_s: list[float]
) -> dict:
    """The physical floors beside the results: each long prompt's prefill, the longest short one's,
    and a decode step of 16 short requests at their mean context (bf16, H200 peaks)."""
    short_ctx = (sum(spec.short_prompt) + sum(spec.short_output) // 2) // 2
    kinds = [t["kind"] for t in trace]
    return {
        "long_prefill_s": [f for f, k in zip(prefill_floors_s, kinds, strict=True) if k == "long"],
        "short_prefill_s_max": max((f for f, k in zip(prefill_floors_s, kinds, strict=True) if k == "short"), default=None),
        "decode_step_s_16_short": decode_step_floor_s(model_dir, 16, short_ctx),
    }  # fmt: skip


def _bf16_config(model_dir: Path):  # -> ModelConfig
    import torch

    from mnemosyne.config import ModelConfig

    return ModelConfig.from_pretrained(model_dir, torch.bfloat16)


def _pcts_ms(values_s: list[float]) -> dict:
    if not values_s:
        return {"n": 0}
    a = np.asarray(values_s) * 1e3
    return {"n": int(a.size), "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "max_ms": float(a.max()), "mean_ms": float(a.mean())}  # fmt: skip


def analyze(trace: list[dict], deadlines: list[tuple[float, float]], run: dict, tbt_slo_ms: float) -> dict:
    """Per-kind TTFT, TBT and SLO attainment of one run (bench records are in trace order).

    TTFT statistics cover the requests whose first token arrived (a request that timed out
    later still has its TTFT); `no_first_token` counts the others, and they miss the TTFT
    deadline. TBT covers every gap between streamed chunks of every request.
    """
    recs = run["bench"]["requests"]
    if len(recs) != len(trace) or any(
        r["prompt_len"] != t["prompt_len"] for r, t in zip(recs, trace, strict=True)
    ):
        raise ValueError(f"{run['config']}: the bench records do not match the trace")
    first = [r["ttft_s"] > 0 for r in recs]
    in_time = [f and r["ttft_s"] <= d for f, r, (_, d) in zip(first, recs, deadlines, strict=True)]
    res: dict = {"ttft": {}, "tbt": {}, "slo": {}}
    gaps: dict[str, list[float]] = {}
    for kind in ("short", "long"):
        idx = [i for i, t in enumerate(trace) if t["kind"] == kind]
        res["ttft"][kind] = _pcts_ms([recs[i]["ttft_s"] for i in idx if first[i]])
        res["ttft"][kind]["no_first_token"] = sum(1 for i in idx if not first[i])
        res["ttft"][kind]["failed"] = sum(1 for i in idx if not recs[i]["success"])
        res["slo"][f"ttft_within_deadline_{kind}"] = sum(in_time[i] for i in idx) / len(idx) if idx else None
        gaps[kind] = [g for i in idx for g in recs[i]["itl_s"]]
    gaps["all"] = gaps["short"] + gaps["long"]
    res["tbt"] = {"short": _pcts_ms(gaps["short"]), "all": _pcts_ms(gaps["all"])}
    for kind in ("short", "all"):
        within = sum(1 for g in gaps[kind] if g * 1e3 <= tbt_slo_ms)
        res["slo"][f"tbt_within_slo_{kind}"] = within / len(gaps[kind]) if gaps[kind] else None
    res["slo"]["ttft_within_deadline_all"] = sum(in_time) / len(recs)
    res["ttft"]["long"]["over_floor"] = [  # each long request's TTFT / its prefill floor (None: no token)
        recs[i]["ttft_s"] / deadlines[i][0] if first[i] else None for i, t in enumerate(trace) if t["kind"] == "long"
    ]  # fmt: skip
    s = run["bench"]["summary"]
    res["throughput"] = {k: s[k] for k in ("duration_s", "completed", "failed", "request_throughput",
                                           "output_throughput", "total_token_throughput")}  # fmt: skip
    res["tbt_all_ms_percentiles"] = (
        [float(x) for x in np.percentile(np.asarray(gaps["all"]) * 1e3, TBT_LEVELS)] if gaps["all"] else []
    )
    res["requests"] = [
        {"kind": t["kind"], "arrival_s": t["arrival_s"], "prompt_len": t["prompt_len"], "output_len": t["output_len"],
         "success": r["success"], "ttft_s": r["ttft_s"] if f else None, "e2e_s": r["e2e_s"], "deadline_s": d[1],
         "error": r["error"][:200]}
        for t, r, d, f in zip(trace, recs, deadlines, first, strict=True)
    ]  # fmt: skip
    for key in ("device", "date", "invocation", "libraries", "startup_s", "warmup_s", "bench_s", "server_exit_code", "server_summary", "server_metrics",
                "server_command", "interrupted"):  # fmt: skip
        res[key] = run.get(key)
    return res


def read_bench(path: Path) -> dict:
    """A bench record file, or its gzipped copy (`PATH.gz`: how committed results keep them)."""
    if path.exists():
        return json.loads(path.read_text())
    with gzip.open(path.with_name(path.name + ".gz"), "rt") as f:
        return json.load(f)


def trace_stats(trace: list[dict]) -> dict:
    out: dict = {"num_requests": len(trace)}
    for kind in ("short", "long"):
        reqs = [t for t in trace if t["kind"] == kind]
        out[f"num_{kind}"] = len(reqs)
        out[f"{kind}_prompt_tokens"] = sum(t["prompt_len"] for t in reqs)
        out[f"{kind}_output_tokens"] = sum(t["output_len"] for t in reqs)
    return out
