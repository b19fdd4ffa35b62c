"""The simulated device of a serving step log: how one measured run's steps departed from
the latency model's predictions, by kind of step, so that another trace or configuration
can be simulated on that device (`mnemosyne simulate --device-step-log STEPLOG`).

From a step log (`engine/step_log.py`; its first `skip_steps` steps left out: warm-up),
each step's ratio = measured_s / predicted_s, the prediction being the engine's own,
uncorrected, from the profile the run used; ratios outside the online calibration's
plausible range are stalls and are dropped, as the calibration drops them::

    chunk factors   per prefix bucket (the calibration's: the chunks' keys before them, 0 under
                    4K tokens, then one per doubling) and path, the median ratio of the steps
                    with a prefill chunk submitted while another step was in flight. The path
                    is the one the worker takes by the step's size: a mixed-step graph up to
                    MIXED_GRAPH_TOKENS, the piecewise graphs up to PIECEWISE_TOKENS, eager
                    above (`worker/mixed_graph.py`, `worker/piecewise_graph.py`; a step the
                    mixed graphs cannot plan runs piecewise on the GPU, and is counted by its
                    size here as in the simulator; so is a larger step that replays a mixed
                    graph of one split, at the piecewise path's device time), and, for
                    steps that carry decodes, chunk bucket (the calibration's: the largest
                    chunk's tokens, 0 up to 32, then one per doubling). A (bucket, path,
                    chunk bucket) with MIN_SAMPLES steps or more keeps its sorted ratios,
                    and its simulated steps take them at quantiles in a fixed
                    low-discrepancy order (the n-th step of the key: q = frac(1/2 + n x
                    0.618...), the golden-ratio sequence; linear between order statistics),
                    the spread the engine's calibration sees (below). One with fewer, and a
                    step without decodes, takes its (bucket, path) median over every chunk size;
                    a (bucket, path) with fewer, its bucket's median over every path; a
                    bucket with fewer than MIN_SAMPLES, the nearest bucket kept (the lower
                    one on a tie)
    idle factor     the median ratio of the steps with a chunk submitted with nothing in flight
                    (`idle_start`: the engine had idled, the device waited for the host's
                    launches); under MIN_SAMPLES such steps, they take the chunk factors
    decode ratios   the ratios of the decode-only steps, sorted, per decode bucket (the number
                    of decodes: 1, 2-3, 4-7, ... doubling; a bucket with fewer than MIN_SAMPLES
                    steps takes the nearest kept): each simulated decode-only step draws one
                    from its bucket (a seeded generator, linear between order statistics)

    simulated step time = the latency model's prediction x the step's factor or draw

Why per prefix bucket: a single median over every chunk step (`--chunk-step-factor`) is set by
the long prompts' steps, which are most of a trace's chunk steps. In the 8B serving trace on
an H200 (benchmarks/results/session14_h200x2_2026-11-30/b/) steps under 4K keys ran at
0.86-0.95x the profile and steps past 128K keys at 1.12-1.14x, so a short request's prefill
was simulated 1.12x its prediction: +37% short TTFT p50 under fixed 2048-token chunks.
Why per path: the engine's calibration sizes a chunk by the window of its own key, and one
key holds both paths. In the 1B trace (`a/`) steps past 256K keys ran at 1.06x through the
mixed graphs and 1.09x piecewise; a short prompt's 512-token chunk beside a long prompt's
192 tokens pushes the step past 512 tokens, so the real engine learned 1.17x for that key
and gave the short prompt 256 tokens a step, where one factor for the bucket let the
simulated engine give it 512 (the lowest slow short TTFT, 159 against 270 ms).
Why per chunk size: the calibration keys it so (`latency/calibration.py`), and the simulated
engine sizes chunks by what its device did at each size. In the 8B serving trace on an H200
(benchmarks/results/session17_h200x2_2026-11-30/b/, steps with decodes) 32-token chunks
after 128K-512K keys ran at 1.02-1.03x the profile and 64-128-token chunks at 1.08-1.12x,
where one factor per bucket gives about 1.06 to both. (That trace's TBT p50 miss, 25.4 ms
simulated against 16.8 ms measured, was not this: the real engine was held at 32-token
chunks where 64 fit by a prompt-only step's sample in the 64-token calibration key, since
kept apart: `StepKind.PREFILL_ONLY`.) Only steps with decodes:
the log's time of a step is result - max(submitted, previous result), and between prompt-only
steps of two long prompts (in turn, 160 and 704 tokens) it splits a pair's time unevenly
(94 / 55 ms logged against 44 / 86 ms predicted, every pair: the same run), which a median
per size keeps and one over the sizes averages out; their sizes follow the 100-ms target
of prompt-only steps, not the token gaps.
Why the spread of a chunk size's ratios beside decodes, not its median: the engine corrects
each key by the 0.98 quantile of its last 32 ratios, about the largest two, and a 64-token
chunk after 256K keys with decodes (8B, H200) was predicted 25.4-25.7 ms and measured 1.118x,
so whether it fits a 30-ms target is decided by the top of that spread. Given every step of a
key at its median, the simulated calibration corrected by the median and kept the larger
chunks: past 128K keys 64 / 96 tokens in 609 / 922 steps where the real engine took 911 / 691,
and the short requests' TBT median came out 25% high in both serving traces of the nineteenth
session simulated on each other's log (benchmarks/results/session19_h200_2026-12-01/). Random
draws from the ratios matched the chunk counts but made the long prompts' chunks depend on the
seed (8B TBT median -1% to +17%, short TTFT median -38% to +6% over three seeds); the fixed
order gives every window of a key the spread of its ratios, with no seed: +11% / +3%, short
TTFT median within 8%, every other figure within 10% as before.
Why draws for decode-only steps: on the 1B shape they are host-bound (p10 / p50 / p90 of
1.00 / 1.18 / 1.45x the profile in the session-14 trace), and a TBT median over a trace
where about half the gaps are decode-only steps samples the top of that spread. Why by the
number of decodes: the host's work grows with the requests a step returns, the profile's
decode times do not (the same trace on another H200 host: 1.09x with one decode, 1.52x
with two or three). Steps with a chunk take no random draw, so a simulation's long prefills do
not depend on the seed.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnemosyne.engine.step_load import add_chunk
from mnemosyne.engine.step_log import read_step_log
from mnemosyne.latency.calibration import (
    MAX_PLAUSIBLE_RATIO,
    CalibrationConfig,
    CalibrationKey,
    StepKind,
    calibration_key,
)
from mnemosyne.latency.composition import GroupLoad, StepComposition

MIN_SAMPLES = 8  # steps a bucket (or the idle class) needs for its own median
MIXED_GRAPH_TOKENS = 512  # layers/attention/static_plan.py MAX_SPLIT_GRAPH_TOKENS: any split count
PIECEWISE_TOKENS = 1024  # worker/piecewise_graph.py MAX_PIECEWISE_TOKENS
SKIP_STEPS = 16  # as benchmarks/step_log_report.py: compiles, graph capture, cold caches
CALIBRATION = CalibrationConfig()  # the engine's keys: its buckets
PREFIX_BUCKET_TOKENS = CALIBRATION.prefix_bucket_tokens
CHUNK_BUCKET_TOKENS = CALIBRATION.chunk_bucket_tokens


def seqs_composition(seqs: list[list[int]]) -> StepComposition:
    """A logged step's load ([query tokens, keys before] per sequence, one KVP group)."""
    load = GroupLoad()
    for n, p in seqs:
        load = add_chunk(load, n, p, owns=True, sample=True)
    return StepComposition.single(load)


def seqs_key(seqs: list[list[int]]) -> CalibrationKey:
    """The calibration's key of a logged step: its kind, the chunks' prefix bucket and the
    largest chunk's bucket."""
    return calibration_key(seqs_composition(seqs), CALIBRATION)


def idle_starts(steps: list[dict]) -> list[bool]:
    """Per logged step, whether it was submitted with nothing in flight (`idle_start`). Logs
    written before that field: the steps with no host_s (submitted before a result since
    idling; with async scheduling also the second, usually a decode ahead without a chunk)."""
    if any("idle_start" in s for s in steps):
        return [bool(s.get("idle_start", False)) for s in steps]
    return [s.get("host_s", 0.0) is None for s in steps]


def decode_bucket(num_decodes: int) -> int:
    """0 for one decode, 1 for 2-3, 2 for 4-7, ... (doubling)."""
    return max(num_decodes, 1).bit_length() - 1


def step_path(num_tokens: int) -> str:
    """The path a step with a chunk takes by its size (the module docstring)."""
    if num_tokens <= MIXED_GRAPH_TOKENS:
        return "mixed_graph"
    return "piecewise" if num_tokens <= PIECEWISE_TOKENS else "eager"


def composition_prefix_bucket(composition: StepComposition) -> int | None:
    """The same bucket of a simulated step (its calibration key's); None for a decode-only step."""
    key = calibration_key(composition, CALIBRATION)
    return None if key.kind is StepKind.DECODE_ONLY else key.prefix_bucket


@dataclass(frozen=True)
class DeviceLog:
    source: str
    chunk_factors: dict[int, float]  # prefix bucket -> median ratio over every path
    path_factors: dict[tuple[int, str], float]  # (prefix bucket, path) -> median ratio
    # (prefix bucket, path, chunk bucket) -> sorted ratios, over the steps that carry decodes
    size_ratios: dict[tuple[int, str, int], tuple[float, ...]]
    idle_factor: float | None
    decode_ratios: dict[int, tuple[float, ...]]  # decode bucket -> sorted ratios
    num_chunk_steps: int
    num_idle_steps: int

    @classmethod
    def from_steps(cls, steps: list[dict], source: str = "steps") -> DeviceLog:
        by_bucket: dict[int, list[float]] = defaultdict(list)
        by_path: dict[tuple[int, str], list[float]] = defaultdict(list)
        by_size: dict[tuple[int, str, int], list[float]] = defaultdict(list)
        idle: list[float] = []
        decode: dict[int, list[float]] = defaultdict(list)
        for s, idle_start in zip(steps, idle_starts(steps), strict=True):
            if s["predicted_s"] <= 0 or not s["seqs"]:
                continue
            ratio = s["measured_s"] / s["predicted_s"]
            if not 1 / MAX_PLAUSIBLE_RATIO <= ratio <= MAX_PLAUSIBLE_RATIO:
                continue
            key = seqs_key(s["seqs"])
            if key.kind is StepKind.DECODE_ONLY:
                decode[decode_bucket(len(s["seqs"]))].append(ratio)
            elif idle_start:
                idle.append(ratio)
            else:
                bucket, path = key.prefix_bucket, step_path(sum(n for n, _ in s["seqs"]))
                by_bucket[bucket].append(ratio)
                by_path[bucket, path].append(ratio)
                if key.kind is StepKind.WITH_CHUNK:  # carries decodes
                    by_size[bucket, path, key.chunk_bucket].append(ratio)
        factors = {b: statistics.median(rs) for b, rs in sorted(by_bucket.items()) if len(rs) >= MIN_SAMPLES}
        if not factors and by_bucket:  # every bucket sparse: one median over all of them
            pooled = [r for rs in by_bucket.values() for r in rs]
            factors = {min(by_bucket): statistics.median(pooled)}
        return cls(
            source=source,
            chunk_factors=factors,
            path_factors=_medians(by_path),
            size_ratios={k: tuple(sorted(rs)) for k, rs in sorted(by_size.items()) if len(rs) >= MIN_SAMPLES},
            idle_factor=statistics.median(idle) if len(idle) >= MIN_SAMPLES else None,
            decode_ratios=_kept({b: tuple(sorted(rs)) for b, rs in sorted(decode.items())}),
            num_chunk_steps=sum(len(rs) for rs in by_bucket.values()),
            num_idle_steps=len(idle),
        )

    @classmethod
    def from_step_log(cls, path: str | Path, skip_steps: int = SKIP_STEPS) -> DeviceLog:
        _, steps = read_step_log(path)
        return cls.from_steps(steps[skip_steps:], str(path))

    def chunk_factor(self, bucket: int, path: str | None = None) -> float:
        """The median ratio of (`bucket`, `path`), else of `bucket` over every path, else of the
        nearest bucket kept (1 with none); a step beside decodes whose chunk-size key has its own
        ratios takes those instead (`LoggedDevice.ratio`)."""
        if (bucket, path) in self.path_factors:
            return self.path_factors[bucket, path]
        if bucket in self.chunk_factors:
            return self.chunk_factors[bucket]
        if not self.chunk_factors:
            return 1.0
        return self.chunk_factors[_nearest(self.chunk_factors, bucket)]

    def decode_quantile(self, q: float, num_decodes: int = 1) -> float:
        """The q-quantile of the decode-only ratios of `num_decodes`'s bucket, else of the
        nearest bucket kept (linear between order statistics; 1 with none)."""
        if not self.decode_ratios:
            return 1.0
        b = decode_bucket(num_decodes)
        ratios = self.decode_ratios[b if b in self.decode_ratios else _nearest(self.decode_ratios, b)]
        return _at_quantile(ratios, q)

    def summary(self) -> dict:
        """What a simulation's setup records (and step_log_report prints)."""
        return {
            "source": self.source,
            "chunk_factors_by_prefix_bucket": {str(b): f for b, f in self.chunk_factors.items()},
            "chunk_factors_by_prefix_bucket_and_path": {
                f"{b}/{p}": f for (b, p), f in self.path_factors.items()
            },
            "chunk_ratio_p10_p50_p90_by_prefix_bucket_path_and_chunk_bucket": {
                f"{b}/{p}/{c}": [_at_quantile(r, q) for q in (0.1, 0.5, 0.9)]
                for (b, p, c), r in self.size_ratios.items()
            },  # the spread those steps take (LoggedDevice.ratio)
            "idle_factor": self.idle_factor,
            "decode_ratio_p10_p50_p90_by_decodes": {
                f"{1 << b}-{(2 << b) - 1}": [self.decode_quantile(q, 1 << b) for q in (0.1, 0.5, 0.9)]
                for b in self.decode_ratios
            },
            "num_decode_steps": sum(len(r) for r in self.decode_ratios.values()),
            "num_chunk_steps": self.num_chunk_steps,
            "num_idle_steps": self.num_idle_steps,
        }


def _medians(by_key: Mapping) -> dict:
    """The median of each key's ratios, for the keys with MIN_SAMPLES or more, in key order."""
    return {k: statistics.median(rs) for k, rs in sorted(by_key.items()) if len(rs) >= MIN_SAMPLES}


def _at_quantile(ratios: tuple[float, ...], q: float) -> float:
    """The q-quantile of sorted ratios, linear between order statistics."""
    pos = q * (len(ratios) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ratios) - 1)
    return ratios[lo] + (pos - lo) * (ratios[hi] - ratios[lo])


def _nearest(buckets: Mapping[int, object], bucket: int) -> int:
    """The bucket of `buckets` nearest `bucket` (the lower one on a tie)."""
    return min(buckets, key=lambda b: (abs(b - bucket), b))


def _kept(by_bucket: dict[int, tuple[float, ...]]) -> dict[int, tuple[float, ...]]:
    """The buckets with MIN_SAMPLES ratios or more; all of them pooled into the smallest
    bucket when none has that many."""
    kept = {b: r for b, r in by_bucket.items() if len(r) >= MIN_SAMPLES}
    if kept or not by_bucket:
        return kept
    return {min(by_bucket): tuple(sorted(x for r in by_bucket.values() for x in r))}


GOLDEN = (5**0.5 - 1) / 2  # the golden-ratio sequence's step: any n consecutive terms spread over [0, 1)


class LoggedDevice:
    """A simulated device timed by a `DeviceLog`; decode-only steps draw from a generator
    seeded with `seed`, steps with a chunk beside decodes take their key's ratios in the
    golden-ratio order of quantiles (module docstring), so a simulation is reproducible."""

    def __init__(self, log: DeviceLog, seed: int = 0) -> None:
        self.log = log
        self._rng = np.random.default_rng(seed)
        self._num_timed: dict[tuple[int, str, int], int] = {}  # per size key: its steps so far

    def ratio(self, composition: StepComposition, idle: bool) -> float:
        """`idle`: submitted with nothing in flight."""
        key = calibration_key(composition, CALIBRATION)
        if key.kind is StepKind.DECODE_ONLY:
            num_decodes = sum(g.num_sampled for g in composition.groups)
            return self.log.decode_quantile(float(self._rng.random()), num_decodes)
        if idle and self.log.idle_factor is not None:
            return self.log.idle_factor
        path = step_path(sum(g.num_tokens for g in composition.groups))
        size_key = (key.prefix_bucket, path, key.chunk_bucket)
        beside_decodes = key.kind is StepKind.WITH_CHUNK  # chunk sizes only there
        ratios = self.log.size_ratios.get(size_key) if beside_decodes else None
        if ratios is None:
            return self.log.chunk_factor(key.prefix_bucket, path)
        n = self._num_timed.get(size_key, 0)
        self._num_timed[size_key] = n + 1
        return _at_quantile(ratios, (0.5 + n * GOLDEN) % 1.0)

    def step_time_s(self, composition: StepComposition, predicted_s: float, idle: bool) -> float:
        return predicted_s * self.ratio(composition, idle)
