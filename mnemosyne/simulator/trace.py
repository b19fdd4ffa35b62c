"""A simulation trace: one JSON object per line,

    {"arrival_s": float, "prompt_len": int, "output_len": int}

or a `mnemosyne bench serve` dataset line (what `benchmarks/serving_trace.py` writes), whose
prompt is its token ids: {"arrival_s": float, "prompt": [int, ...], "output_len": int}; only
its length is used. Other keys (e.g. "kind") are ignored.
"""

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


def _prompt_len(d: dict) -> int:
    if "prompt_len" in d:
        return int(d["prompt_len"])
    prompt = d["prompt"]  # KeyError when neither is there
    if not isinstance(prompt, list):
        raise TypeError('"prompt" must be a list of token ids (a text prompt has no length in tokens here)')
    return len(prompt)


def parse_trace_line(line: str, where: str) -> TraceRequest:
    try:
        d = json.loads(line)
        req = TraceRequest(float(d["arrival_s"]), _prompt_len(d), int(d["output_len"]))
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f'{where}: expected {{"arrival_s": float, "prompt_len": int (or "prompt": [token ids]), '
            f'"output_len": int}} ({type(e).__name__}: {e})'
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
