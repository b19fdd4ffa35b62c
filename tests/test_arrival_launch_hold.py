"""benchmarks/probes/arrival_launch_hold.py on CPU (tiny model): the probe runs end to end,
one row per arrival with the calls up to its first token and the launching call's profile."""

from __future__ import annotations

import json

from benchmarks.probes.arrival_launch_hold import main as probe


def test_arrival_launch_hold_probe_runs(tmp_path) -> None:
    out = tmp_path / "alh.json"
    res = probe(["--out", str(out), "--shape", "tiny-llama", "--sizes", "40,9", "--rows", "5"])
    assert [a["tokens"] for a in res["arrivals"]] == [40, 9]
    for a in res["arrivals"]:
        assert a["calls"] and all(c["wall_ms"] > 0 for c in a["calls"])
        assert sum(n for c in a["calls"] for s in c["steps"] for n in s["chunks"]) == a["tokens"]
        assert "cumulative" in a["launch_call_cumulative"] and a["launch_call_torch_profiler"] == ""
    assert json.loads(out.read_text())["shape"] == "tiny-llama"
    assert (tmp_path / res["step_log"]).stat().st_size > 0
