"""benchmarks/spp_stage_times.py on CPU: the pipeline prediction and a tiny end-to-end run (issue 20)."""

from __future__ import annotations

import argparse
import json

import pytest

from benchmarks.spp_stage_times import interpolate, predict_ttft_s, prefixes_for
from mnemosyne.bench.long_context.run import write_model_dir


def test_prefixes_cover_every_context() -> None:
    assert prefixes_for([1 << 19], 8192) == [0, 1 << 16, 1 << 17, 1 << 18, 3 << 17, (1 << 19) - 8192]
    ps = prefixes_for([1 << 19, 1 << 20], 8192)
    assert (
        ps[0] == 0 and ps[-1] == (1 << 20) - 8192 and (1 << 19) - 8192 in ps and all(p % 8 == 0 for p in ps)
    )


def test_interpolate() -> None:
    pts = [(0, 1.0), (10, 2.0), (20, 4.0)]
    assert interpolate(pts, 5) == pytest.approx(1.5)
    assert interpolate(pts, 20) == pytest.approx(4.0)
    assert interpolate(pts, 30) == pytest.approx(6.0)
    assert interpolate([(0, 3.0)], 99) == 3.0


@pytest.mark.parametrize("spp", [1, 2, 4])
def test_constant_stage_times_give_the_pipeline_closed_form(tmp_path, spp: int) -> None:
    """With a chunk time t per slice at every prefix and free sends, n chunks on spp stages of
    4/spp slices each take (n + spp - 1) * 4 t / spp: the fill, then one chunk per stage time."""
    full_dir = write_model_dir("tiny-llama", tmp_path, 1 << 16)
    ns = argparse.Namespace(num_stages=4, link_GBps=1e12, gpu="h200")
    t, n, c = 0.01, 512, 32
    for depth in (None, 1 << 20):
        got = predict_ttft_s(full_dir, ns, [(0, t)], n, c, spp, depth)
        assert got == pytest.approx((n // c + spp - 1) * 4 * t / spp)


def test_spp_stage_times_cpu_smoke(tmp_path) -> None:
    from benchmarks.spp_stage_times import main

    out = tmp_path / "s.json"
    main(["--shape", "tiny-llama", "--device", "cpu", "--contexts", "128", "--chunks", "16,32",
          "--check-full", "0", "--repeats", "1", "--out", str(out)])  # fmt: skip
    res = json.loads(out.read_text())
    assert res["stage_layers"] == 1 and res["command"].startswith("python -m benchmarks.spp_stage_times")
    assert {(m["chunk"], m["prefix"]) for m in res["stage_chunk_times"]} >= {(16, 0), (16, 112), (32, 96)}
    assert len(res["full_model_check"]) == 2
    for p in res["predictions"]:
        t1 = p["spp"]["1"]["fixed_inflight"]["ttft_s"]
        for spp in ("2", "4"):
            row = p["spp"][spp]["fixed_inflight"]
            assert 0 < row["ttft_s"] < t1 and row["efficiency"] == pytest.approx(
                t1 / (int(spp) * row["ttft_s"])
            )


def test_spp_ttft_layouts_and_cpu_smoke(tmp_path) -> None:
    """benchmarks/spp_ttft.py: layout parsing, and one prompt through spp1 and spp2@3 on gloo."""
    from benchmarks.spp_ttft import main, parse_layout
    from mnemosyne.engine.step_log import read_step_log

    assert parse_layout("spp2xkvp2@4") == {"tp": 1, "spp": 2, "kvp": 2, "pipeline_depth": 4}
    assert parse_layout("tp2") == {"tp": 2, "spp": 1, "kvp": 1, "pipeline_depth": None}
    with pytest.raises(SystemExit, match="bad layout"):
        parse_layout("pp2")
    out = tmp_path / "t.json"
    argv = [
        "--shape",
        "tiny-llama",
        "--device",
        "cpu",
        "--context",
        "200",
        "--chunk",
        "32",
        "--layouts",
        "spp1,spp2@3",
    ]
    assert main([*argv, "--out", str(out), "--step-log-dir", str(tmp_path / "logs")]) == 0
    res = json.loads(out.read_text())
    base, spp2 = res["layouts"]
    for row in (base, spp2):  # every step's gap, and the engine's step log of each layout
        assert len(row["step_gaps_s"]) == row["num_steps"]
        _, steps = read_step_log(tmp_path / "logs" / f"{row['layout']}.steps.jsonl")
        assert len(steps) >= row["num_steps"] and all(s["host_s"] is None or s["host_s"] >= 0 for s in steps)
    assert res["num_chunks"] == 7 and base["world_size"] == 1 and spp2["world_size"] == 2
    assert base["ttft_s"] > 0 and base["num_steps"] >= 7 and "efficiency" not in base
    assert spp2["pipeline_depth"] == 3 and spp2["efficiency"] == pytest.approx(
        base["ttft_s"] / (2 * spp2["ttft_s"])
    )
    assert spp2["floor_s"] == pytest.approx(base["floor_s"] / 2) and spp2["send_s"] > 0
