"""A serving step log replayed through the online calibration (`latency/calibration.py`): the
factor that sized chunks beside decodes, per calibration key, over the run, with prompt-only
steps as their own kind (the engine now) and pooled with the steps beside decodes (the
engine before the seventeenth session). CPU only::

    python -m benchmarks.probes.calibration_replay STEPLOG [--prefix-bucket 6] [--out OUT.json]

Each logged step becomes a composition (its decodes over their keys, its chunks after their
keys) observed with its logged time (measured_s is the calibration's own device time:
result - max(submitted, previous result)) and its logged, uncorrected prediction. After
every step the factor of each (prefix bucket, chunk bucket) key of steps beside decodes is
read, and the time spans where the pooled replay's factor is over 1.1x the other's are
reported, with the chunk sizes the engine took beside decodes at that prefix bucket in them
(spans without such a step are left out).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mnemosyne.engine.step_log import read_step_log
from mnemosyne.latency.calibration import (
    CalibrationConfig,
    CalibrationKey,
    OnlineCalibration,
    StepKind,
    calibration_key,
)
from mnemosyne.latency.composition import StepComposition
from mnemosyne.simulator.device_log import seqs_composition

DIFF = 1.10  # factor ratio reported as a difference


def composition(seqs: list[list[int]], pooled: bool) -> StepComposition:
    """A logged step's load; `pooled`: a prompt-only step gets a stand-in decode, so it takes
    the key of a step beside decodes (the old keys)."""
    comp = seqs_composition(seqs)
    (load,) = comp.groups
    if pooled and load.num_chunks and not load.num_decodes:
        return StepComposition.single(load.plus_decode(1))
    return comp


def replay(steps: list[dict], pooled: bool, prefix_bucket: int) -> list[dict[int, float]]:
    """Per step, the factor of each chunk bucket's key beside decodes at `prefix_bucket`."""
    cal = OnlineCalibration()
    out = []
    t = 0.0
    for s in steps:
        if s["predicted_s"] > 0 and s["seqs"]:
            done = t + s["measured_s"]
            cal.observe(composition(s["seqs"], pooled), s["predicted_s"], t, done)
            t = done
        out.append({c: cal.factor(CalibrationKey(StepKind.WITH_CHUNK, prefix_bucket, c)) for c in range(4)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step_log", type=Path)
    ap.add_argument("--prefix-bucket", type=int, default=6, help="6: chunks after 128K-256K keys")
    ap.add_argument("--out", type=Path, default=None)
    ns = ap.parse_args()
    _, steps = read_step_log(ns.step_log)
    apart = replay(steps, pooled=False, prefix_bucket=ns.prefix_bucket)
    pooled = replay(steps, pooled=True, prefix_bucket=ns.prefix_bucket)
    config = CalibrationConfig()
    spans: list[dict] = []
    open_spans: dict[int, dict] = {}  # chunk bucket -> its span while the factors differ
    for i, s in enumerate(steps):
        for c in range(4):
            if pooled[i][c] > DIFF * apart[i][c]:
                span = open_spans.get(c)
                if span is None:
                    span = open_spans[c] = {"chunk_bucket": c, "from_s": s["t_s"], "to_s": s["t_s"],
                                            "pooled_max": 0.0, "apart_max": 0.0, "chunks_beside_decodes": {}}  # fmt: skip
                    spans.append(span)
                span["to_s"] = s["t_s"]
                span["pooled_max"] = max(span["pooled_max"], pooled[i][c])
                span["apart_max"] = max(span["apart_max"], apart[i][c])
            else:
                open_spans.pop(c, None)
        # the sizes taken beside decodes at this prefix bucket while a span is open
        beside = any(n == 1 for n, _ in s["seqs"]) and any(n > 1 for n, _ in s["seqs"])
        if (
            beside
            and calibration_key(composition(s["seqs"], False), config).prefix_bucket == ns.prefix_bucket
        ):
            for span in open_spans.values():
                for n, _ in s["seqs"]:
                    if n > 1:
                        span["chunks_beside_decodes"][n] = span["chunks_beside_decodes"].get(n, 0) + 1
    spans = [x for x in spans if x["chunks_beside_decodes"]]  # spans that sized a step beside decodes
    result = {
        "command": f"python -m benchmarks.probes.calibration_replay {ns.step_log} --prefix-bucket {ns.prefix_bucket}",
        "step_log": str(ns.step_log),
        "prefix_bucket": ns.prefix_bucket,
        "spans_pooled_over_apart": spans,
    }
    for span in spans:
        print(json.dumps(span))
    if ns.out is not None:
        ns.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
