"""Per-request records of a serving benchmark and their summary (throughput, latency, goodput)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PERCENTILES: tuple[tuple[str, float], ...] = (("median", 50.0), ("p90", 90.0), ("p99", 99.0))
LATENCY_METRICS: tuple[tuple[str, str], ...] = (
    ("ttft", "TTFT"),
    ("tbt", "TBT"),
    ("tpot", "TPOT"),
    ("e2e", "E2E"),
)


@dataclass
class RequestRecord:
    """What one benchmark request measured (times in seconds, on the `time.perf_counter` clock).

    `prompt_len` is -1 when unknown; `output_len` is the server's `usage.completion_tokens`
    (or the number of content chunks when the server sent no usage). `itl_s` holds the gaps
    between successive content chunks after the first; `start_time` is when it was sent;
    `sent` is False for a request the benchmark never sent (stopped before its arrival).
    """

    success: bool
    error: str = ""
    prompt_len: int = 0
    output_len: int = 0
    ttft_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    e2e_s: float = 0.0
    start_time: float = 0.0
    sent: bool = True

    def tpot_s(self) -> float | None:
        """Mean time per output token after the first, or None with fewer than 2 output tokens."""
        if self.output_len <= 1:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_len - 1)


def _stats_ms(prefix: str, values_s: Sequence[float]) -> dict[str, float | None]:
    """mean/median/p90/p99 in milliseconds (None for each when there are no values)."""
    out: dict[str, float | None] = {}
    arr = np.asarray(values_s, dtype=np.float64) * 1000.0
    out[f"mean_{prefix}_ms"] = float(arr.mean()) if arr.size else None
    for name, q in PERCENTILES:
        out[f"{name}_{prefix}_ms"] = float(np.percentile(arr, q)) if arr.size else None
    return out


def _meets_slo(rec: RequestRecord, slo_ttft_ms: float | None, slo_tbt_ms: float | None) -> bool:
    """TTFT <= slo_ttft and TPOT <= slo_tbt (None: no constraint; no TPOT with one output token)."""
    if slo_ttft_ms is not None and rec.ttft_s * 1000.0 > slo_ttft_ms:
        return False
    tpot = rec.tpot_s()
    return slo_tbt_ms is None or tpot is None or tpot * 1000.0 <= slo_tbt_ms


def summarize(
    records: Sequence[RequestRecord],
    duration_s: float,
    slo_ttft_ms: float | None = None,
    slo_tbt_ms: float | None = None,
) -> dict[str, Any]:
    """Aggregate metrics of a benchmark run that took `duration_s` seconds.

    Latency statistics cover successful requests only: TTFT and E2E per request, TBT over all
    inter-chunk gaps pooled, TPOT per request with more than one output token. Goodput is the
    rate of successful requests meeting both SLOs; `slo_attainment` is their fraction of all
    requests (failures count as misses); `tbt_violation_fraction` is the fraction of pooled TBT gaps
    above `slo_tbt_ms` (None without that SLO or without gaps). Unknown prompt lengths (-1) count 0.
    """
    ok = [r for r in records if r.success]
    duration = max(duration_s, 1e-9)
    total_in = sum(max(r.prompt_len, 0) for r in ok)
    total_out = sum(r.output_len for r in ok)
    gaps = [g for r in ok for g in r.itl_s]
    tpots = [t for t in (r.tpot_s() for r in ok) if t is not None]
    good = sum(1 for r in ok if _meets_slo(r, slo_ttft_ms, slo_tbt_ms))
    summary: dict[str, Any] = {
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "duration_s": duration_s,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration,
        "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
        "slo_ttft_ms": slo_ttft_ms,
        "slo_tbt_ms": slo_tbt_ms,
        "request_goodput": good / duration,
        "slo_attainment": good / len(records) if records else 0.0,
        "tbt_violation_fraction": (
            sum(1 for g in gaps if g * 1000.0 > slo_tbt_ms) / len(gaps)
            if slo_tbt_ms is not None and gaps
            else None
        ),
    }
    summary.update(_stats_ms("ttft", [r.ttft_s for r in ok]))
    summary.update(_stats_ms("tbt", gaps))
    summary.update(_stats_ms("tpot", tpots))
    summary.update(_stats_ms("e2e", [r.e2e_s for r in ok]))
    return summary


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_table(summary: dict[str, Any]) -> str:
    """The summary as a plain aligned text table, in the style of `vllm bench serve`."""
    width = 50
    label_w = 40
    lines = [" Serving Benchmark Result ".center(width, "=")]

    def row(label: str, value: Any, digits: int = 2) -> None:
        lines.append(f"{label:<{label_w}}{_fmt(value, digits):>{width - label_w}}")

    row("Successful requests:", summary["completed"])
    row("Failed requests:", summary["failed"])
    row("Benchmark duration (s):", summary["duration_s"])
    row("Total input tokens:", summary["total_input_tokens"])
    row("Total generated tokens:", summary["total_output_tokens"])
    row("Request throughput (req/s):", summary["request_throughput"])
    row("Output token throughput (tok/s):", summary["output_throughput"])
    row("Total token throughput (tok/s):", summary["total_token_throughput"])
    slo_ttft, slo_tbt = summary.get("slo_ttft_ms"), summary.get("slo_tbt_ms")
    if slo_ttft is not None or slo_tbt is not None:
        slos = ", ".join(
            f"{name} <= {_fmt(float(v), 1)} ms"
            for name, v in (("TTFT", slo_ttft), ("TPOT", slo_tbt))
            if v is not None
        )
        lines.append(f" SLO: {slos} ".center(width, "-"))
        row("Request goodput (req/s):", summary["request_goodput"])
        row("SLO attainment (%):", 100.0 * summary["slo_attainment"])
        if summary.get("tbt_violation_fraction") is not None:
            row("TBT gaps above SLO (%):", 100.0 * summary["tbt_violation_fraction"])
    lines.append(" Latency (ms) ".center(width, "-"))
    cols = ("mean", *(name for name, _ in PERCENTILES))
    headers = ("mean", "p50", "p90", "p99")
    col_w = (width - 10) // len(cols)
    lines.append(f"{'':<10}" + "".join(f"{h:>{col_w}}" for h in headers))
    for key, label in LATENCY_METRICS:
        vals = (_fmt(summary.get(f"{c}_{key}_ms")) for c in cols)
        lines.append(f"{label:<10}" + "".join(f"{v:>{col_w}}" for v in vals))
    lines.append("=" * width)
    return "\n".join(lines)
