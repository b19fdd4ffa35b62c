"""The two-lane probe's timing loop (`benchmarks/probes/two_lane_overlap.py`) on fake lanes:
the chunk steps run on the launcher thread, every one of them runs once and in order, and the
decode lane's periods are counted only while the prompt runs."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from benchmarks.probes.two_lane_overlap import summary, time_prompt


class _Stream:
    def synchronize(self) -> None:
        pass


def test_time_prompt_runs_every_chunk_step_beside_the_decode_lane() -> None:
    ran: list[int] = []

    def chunk_step(i: int):
        def run() -> None:
            time.sleep(0.02)
            ran.append(i)

        return run

    decodes: list[float] = []

    def decode() -> None:
        time.sleep(0.002)
        decodes.append(time.perf_counter())

    with ThreadPoolExecutor(max_workers=1) as launcher:
        periods, prompt_s = time_prompt(
            decode, _Stream(), [chunk_step(i) for i in range(5)], _Stream(), launcher
        )
    assert ran == [0, 1, 2, 3, 4]
    assert prompt_s >= 5 * 0.02
    assert 5 <= len(periods) < len(decodes)  # decodes ran beside the prompt; none counted after it
    assert all(p >= 0.002 for p in periods)


def test_time_prompt_alone_and_summary() -> None:
    ran: list[int] = []
    with ThreadPoolExecutor(max_workers=1) as launcher:
        periods, prompt_s = time_prompt(None, None, [lambda: ran.append(1)] * 3, _Stream(), launcher)
    assert (periods, len(ran)) == ([], 3) and prompt_s >= 0
    s = summary([0.001, 0.002, 0.003, 0.010])
    assert s == {"n": 4, "p50_ms": 2.5, "p99_ms": 10.0, "max_ms": 10.0, "over_30ms": 0, "over_45ms": 0,
                 "top5_ms": [1.0, 2.0, 3.0, 10.0]}  # fmt: skip
