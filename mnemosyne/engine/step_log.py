"""A JSON-lines record of every step the engine ran: what it held, what the latency model
predicted, how long it took. For checking a latency profile against the steps a real run
served (`benchmarks/refit_latency_profile.py --validation FILE`), and for finding steps that
overrun their prediction.

    line 1      {"format": "mnemosyne-step-log-1", "device", "model_dir", "dtype", "layout",
                 "block_size", "async_scheduling"}
    each step   {"t_s":        seconds from the engine's start to the step's result
                 "measured_s": its time: result - max(submitted, previous result) with async
                               scheduling (the device began it when the step before ended;
                               an eager step kept until the decode step before it was read,
                               `executor/uniproc.py`, also counts the host work before its
                               launch), result - submitted without
                 "predicted_s": the latency model's uncorrected prediction
                 "host_s":     the host's time from the latest result before this step's
                               submission to that submission: output processing, the engine
                               core's messages (arriving prompts), scheduling; null for the
                               first step after idling. Longer than the step in flight, the
                               device idles (before this field, a long prompt's arrival on an
                               H200 was inferred from the step after it: 57-90 ms)
                 "wait_s":     the host's time in the executor's get_result for it: a long
                               step with wait_s ~ measured_s came late from the device (or
                               the GIL was held as it came); with a short wait_s, the host
                               asked late (output processing, the lane's launches, the GIL)
                 "seqs":       [[query tokens, keys before them], ...] per chunk, decodes
                               first: the shape of a profile's samples (`latency/profile_store.py`)
                 "path":       how the (first) reporting rank ran it (`wire.plan.StepPath`:
                               decode_graph, mixed_graph, piecewise, eager, idle); with eager
                               attention also "cudnn_chunks" (chunks on cuDNN) and
                               "chunk_splits" (the key splits of each Triton chunk launch:
                               [] none, two when a long prefix runs apart, layers/attention/tile_groups.py);
                               absent where the executor reports no trace (the simulator)
                 "idle_start": true for a step submitted with nothing in flight (present only
                               then): the device waited for its launches, which a step in
                               flight would have hidden
                 "beside_lane": true for a step processed while prefill lane chunks were in
                               flight (present only then): it shared the GPU with them
                 "steps_sms":  the SMs it was confined to beside a lane chunk (CUDA only;
                               absent: every SM)}
    each prefill lane chunk (engine/prefill_lane.py)
                {"t_s", "lane": true, "seqs": [[chunk tokens, keys before them]],
                 "measured_s": processed - max(submitted, the lane's previous chunk processed):
                               the engine sees a chunk done when it next polls, at the start
                               of a step (a step's time of resolution)
                 "predicted_s": the latency model's prediction of the chunk alone on the GPU
                 "steps_sms":  the SMs it left the steps (CUDA only)
                 "cudnn_chunks", "chunk_splits": as for a step (absent in the simulator)
                 "lane_timing": `wire.plan.LaneChunkTiming`: launch_s (the lane thread's
                               launching), paced_s (of which waiting for the chunk's earlier
                               layers), device_s (the lane stream's), the caching allocator's
                               num_device_allocs / num_device_frees / num_alloc_retries over
                               the chunk (the device's, the steps' included)}

`read_step_log` returns the steps that had the GPU to themselves (what a latency profile
predicts); `read_lane_log` the lane's chunks and the steps beside them.

Only the engine's policies read the latency model; this changes no schedule. Times in
seconds, sizes in tokens.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path
from typing import TextIO

from mnemosyne.config import EngineConfig
from mnemosyne.engine.scheduler_output import SchedulerOutput
from mnemosyne.wire.plan import StepPath, StepTrace

STEP_LOG_FORMAT = "mnemosyne-step-log-1"


class StepLog:
    def __init__(self, path: str | Path, config: EngineConfig, start_s: float) -> None:
        """`start_s`: the engine's start on the clock of `write`'s times (time.monotonic())."""
        self._file: TextIO | None = Path(path).open("w", encoding="utf-8")
        self._start_s = start_s
        p = config.parallel
        header = {
            "format": STEP_LOG_FORMAT,
            "device": config.device,
            "model_dir": config.model_dir,
            "dtype": str(config.model.dtype).removeprefix("torch."),
            "layout": {"tp": p.tp, "spp": p.spp, "kvp": p.kvp},
            "block_size": config.cache.block_size,
            "async_scheduling": config.scheduler.async_scheduling,
        }
        self._file.write(json.dumps(header) + "\n")

    def write(
        self,
        done_s: float,
        measured_s: float,
        predicted_s: float,
        sched: SchedulerOutput,
        host_s: float | None,
        trace: StepTrace | None = None,
        idle_start: bool = False,
        beside_lane: bool = False,
        wait_s: float | None = None,
    ) -> None:
        if self._file is None:
            return
        line = {"t_s": round(done_s - self._start_s, 6), "measured_s": measured_s, "predicted_s": predicted_s,
                "host_s": None if host_s is None else round(host_s, 6), "seqs": _seqs(sched)}  # fmt: skip
        if wait_s is not None:
            line["wait_s"] = round(wait_s, 6)
        if idle_start:
            line["idle_start"] = True
        if beside_lane:
            line["beside_lane"] = True
        if trace is not None:
            line["path"] = trace.path.value
            if trace.path in (StepPath.PIECEWISE, StepPath.EAGER):
                line["cudnn_chunks"], line["chunk_splits"] = trace.num_cudnn_chunks, list(trace.chunk_splits)
            if trace.steps_sms is not None:
                line["steps_sms"] = trace.steps_sms
        self._file.write(json.dumps(line) + "\n")

    def write_lane_chunk(
        self,
        done_s: float,
        measured_s: float,
        predicted_s: float,
        sched: SchedulerOutput,
        steps_sms: int | None,
        trace: StepTrace | None = None,
    ) -> None:
        if self._file is None:
            return
        line = {"t_s": round(done_s - self._start_s, 6), "lane": True, "measured_s": measured_s,
                "predicted_s": predicted_s, "seqs": _seqs(sched)}  # fmt: skip
        if steps_sms is not None:
            line["steps_sms"] = steps_sms
        if trace is not None:
            line["cudnn_chunks"], line["chunk_splits"] = trace.num_cudnn_chunks, list(trace.chunk_splits)
            if trace.lane is not None:
                line["lane_timing"] = dataclasses.asdict(trace.lane)
        self._file.write(json.dumps(line) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _seqs(sched: SchedulerOutput) -> list[list[int]]:
    """[[query tokens, keys before them], ...] per chunk, in schedule order."""
    return [[c.num_tokens, c.start] for c in sched.chunks]


def read_step_log(path: str | Path) -> tuple[dict, list[dict]]:
    """(header, steps) of a step log, or of one gzipped (`.gz`, as benchmarks/results keeps
    them): the steps that had the GPU to themselves (no lane chunk, no step beside one); a
    truncated last line (a killed engine) is skipped."""
    header, lines = _read_lines(path)
    return header, [line for line in lines if not line.get("lane") and not line.get("beside_lane")]


def read_lane_log(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(the prefill lane's chunks, the steps beside them) of a step log."""
    _, lines = _read_lines(path)
    return [line for line in lines if line.get("lane")], [line for line in lines if line.get("beside_lane")]


def _read_lines(path: str | Path) -> tuple[dict, list[dict]]:
    path = Path(path)
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    lines = raw.decode("utf-8").splitlines()
    try:
        header = json.loads(lines[0]) if lines else None
    except json.JSONDecodeError:
        header = None
    if not isinstance(header, dict) or header.get("format") != STEP_LOG_FORMAT:
        raise ValueError(f"{path} is not a step log (its first line is not a {STEP_LOG_FORMAT} header)")
    steps = []
    for line in lines[1:]:
        try:
            steps.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return header, steps
