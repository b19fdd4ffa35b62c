"""The latency model with and without the chunk kernels' query-tile padding, against a
measured step log (CPU only: the steps' compositions and times come from the log).

    python -m benchmarks.probes.chunk_tile_padding --step-log LOG.jsonl.gz --profile P --out OUT.json

Per (64K-key prefix bucket, chunk size) of the steps with a chunk after >= --min-prefix keys:
the median of measured / predicted with the profile's model as loaded (its chunks padded to
whole query tiles, `ChunkAttentionCost.padded_tokens`) and with tile_tokens = 1 (no padding,
the model before). A right model gives the same median at every chunk size of a bucket.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from collections import defaultdict
from pathlib import Path

from mnemosyne.engine.step_log import read_step_log
from mnemosyne.latency.profile_store import load_profile
from mnemosyne.simulator.device_log import seqs_composition

BUCKET_TOKENS = 65536


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--step-log", type=Path, required=True)
    ap.add_argument("--profile", required=True)
    ap.add_argument("--min-prefix", type=int, default=131072)
    ap.add_argument("--min-steps", type=int, default=10)
    ap.add_argument("--out", type=Path, required=True)
    ns = ap.parse_args(argv)
    padded = load_profile(ns.profile).model
    if padded.chunk_attention is None:
        raise SystemExit(f"{ns.profile} has no chunk cost table: no tiles to pad to")
    unpadded = dataclasses.replace(padded, chunk_attention=dataclasses.replace(padded.chunk_attention, tile_tokens=1))
    _, steps = read_step_log(ns.step_log)
    ratios: dict[tuple[int, int], tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
    for step in steps:
        composition = seqs_composition(step["seqs"])
        for c, prefix in step["seqs"]:
            if c > 1 and prefix >= ns.min_prefix:
                pair = ratios[prefix // BUCKET_TOKENS * BUCKET_TOKENS, c]
                pair[0].append(step["measured_s"] / unpadded.step_time_s(composition))
                pair[1].append(step["measured_s"] / padded.step_time_s(composition))
    rows = [
        {"prefix_bucket": bucket, "chunk": c, "num_steps": len(a),
         "measured_over_predicted_unpadded": statistics.median(a), "measured_over_predicted_padded": statistics.median(b)}
        for (bucket, c), (a, b) in sorted(ratios.items()) if len(a) >= ns.min_steps
    ]  # fmt: skip
    for r in rows:
        print(json.dumps(r))
    res = {"benchmark": "chunk_tile_padding", "step_log": str(ns.step_log), "profile": ns.profile,
           "tile_tokens": padded.chunk_attention.tile_tokens, "rows": rows}  # fmt: skip
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
