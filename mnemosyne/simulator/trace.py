"""A simulation trace: one JSON object per line, {"arrival_s": float, "prompt_len": int, "output_len": int}."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mnemosyne.errors import ConfigError


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float
    prompt_len: int
    output_len: int


def parse_trace_line(line: str, where: str) -> TraceRequest:
    try:
        d = json.loads(line)
        req = TraceRequest(float(d["arrival_s"]), int(d["prompt_len"]), int(d["output_len"]))
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f'{where}: expected {{"arrival_s": float, "prompt_len": int, "output_len": int}} ({e})'
        ) from None
    if req.arrival_s < 0 or req.prompt_len < 1 or req.output_len < 1:
        raise ConfigError(f"{where}: arrival_s must be >= 0, prompt_len and output_len >= 1, got {req}")
    return req


def load_trace(path: str | Path) -> list[TraceRequest]:
    """The trace's requests in file order (request i is "req-i" in the simulation)."""
    p = Path(path)
    try:
        lines = p.read_text().splitlines()
    except OSError as e:
        raise ConfigError(f"cannot read trace {p}: {e}") from None
    reqs = [parse_trace_line(ln, f"{p}:{i + 1}") for i, ln in enumerate(lines) if ln.strip()]
    if not reqs:
        raise ConfigError(f"trace {p} has no requests")
    return reqs
