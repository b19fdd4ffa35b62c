"""Online calibration: correct a latency model's predictions from the run's own step times.

An offline profile mispredicts steps of a long run by 10-25% (clocks under sustained
load, real block tables, host time outside the profile), so adaptive chunks sized by it
miss the TBT target. The engine reports every processed micro-batch; this keeps a
robust running correction per step kind and adds the host time between steps::

    key(step)        = (kind, prefix bucket, chunk bucket)
                       kind   DECODE_ONLY (no prefill chunk; both buckets 0) | WITH_CHUNK
                              (chunks and decodes: sized by the TBT target) | PREFILL_ONLY
                              (chunks, no decode: sized by prefill_only_step_s)
                       prefix bucket (largest chunk prefix // prefix_bucket_tokens).bit_length():
                              0 below 4K tokens, 1 for [4K, 8K), 2 for [8K, 16K), ... (doubling)
                       chunk bucket ((largest chunk's tokens - 1) // chunk_bucket_tokens).bit_length():
                              0 up to 32 tokens, 1 for 33-64, 2 for 65-128, ... (doubling)
                       The model's error differs by chunk size as well as by prefix: one
                       window for 32- and 64-token chunks after 200K keys (8B, H200: 1.2x and
                       1.3x) let its quantile follow the 32-token steps, under-correct every
                       64-token step and pass it, so the chunk size flipped between the two
                       with one step in eight over the target. The kinds keep prompt-only
                       steps apart: between two long prompts' prompt-only steps in turn the
                       measured time of a pair is split unevenly (one of them 1.9-3.4x its
                       prediction, the other under it), and one such 64-token step in the
                       window of the 64-token key past 128K keys (8B serving trace, H200,
                       benchmarks/results/session17_h200x2_2026-11-30/b/) raised that key's
                       factor to about 1.7: the steps with decodes then took 32 tokens for
                       the next 10 s where 64 fit, and no 64-token step came to push the
                       sample out of the window. A step scheduled with a prefill's first
                       decode ahead after its chunks is sized under PREFILL_ONLY and
                       observed under WITH_CHUNK (decodes are scheduled first otherwise).
    observe(comp, predicted_s, submitted_s, done_s):
        device_s = done_s - max(submitted_s, last done_s)   its own time: a serial device
                   (spp == 1) runs micro-batches in order, so one submitted early waited for
                   the one before it. A pipeline (spp = S > 1): a micro-batch submitted after
                   the previous result crossed an empty pipeline, so done_s - submitted_s
                   against predicted_s (which covers all S stages); one submitted before it
                   ran beside the others, and the last stage hands out one result per stage
                   time, so done_s - last done_s against predicted_s / S (micro-batches
                   that differ make that gap their neighbours' too: the quantile keeps the
                   larger ratios). Without these, a pipeline kept full is never measured and
                   its chunks stay sized by the profile (simulated, 8B, tp2 x spp2 with the
                   device 1.136x the profile: half the token gaps over a 30 ms target).
        host_s   = max(0, submitted_s - last done_s)      scheduling and output processing
                   between two results: part of every token gap, in no latency model
        the first skip_first_steps steps are ignored (compiles, graph capture, cold caches);
        a ratio outside [1 / MAX_PLAUSIBLE_RATIO, MAX_PLAUSIBLE_RATIO] is dropped (a stall)
    factor(key)      = exp(the `quantile` of the last window_steps log(device_s / predicted_s) of
                       that key), clipped to [min_factor, max_factor]; a key with fewer than
                       min_samples samples takes the nearest warm key of the same kind (fewest
                       bucket steps in all; then the same chunk bucket; then the smaller
                       buckets), else the quantile over all keys, else 1 (no correction yet),
                       but never less than the largest ratio of its own first samples (a stand-in
                       from other steps under-corrected the first chunks of a long prompt on an
                       H200: 17 steps of 30-34 ms against a 30 ms target)
    host_s           = median of the last window_steps host gaps (0 until min_samples)
    corrected_s      = factor(key) * predicted_s + host_s

The quantile (0.98 by default) sizes chunks so that about that fraction of full-budget
steps lands within the target: a median leaves half of them just over it (measured on an
H200: 8% of a serving trace's token gaps at 30-33 ms against a 30 ms target), and 0.9 left
the 8B mixed scenario's TBT p99 at 30.02-30.08 ms in three runs, against 29.70 ms at 0.98
for 1.6% more TTFT (benchmarks/results/session13_h200x2_2026-11-30/e). Over a window of 32
samples the 0.98 quantile lies between the two largest: one stall within MAX_PLAUSIBLE_RATIO
(larger ones are dropped) raises its key's factor until 32 newer samples of that key push
it out, and a lasting change shows at once.
Only chunk sizes change with the correction: the scheduler output, the tokens and the
logits do not. Times in seconds, sizes in tokens.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import dataclass

from mnemosyne.latency.composition import StepComposition
from mnemosyne.latency.model import LatencyModel

MAX_PLAUSIBLE_RATIO = 8.0  # measured / predicted beyond this (either way) is a stall, not the model


class StepKind(enum.Enum):
    DECODE_ONLY = "decode_only"
    WITH_CHUNK = "with_chunk"  # prefill chunks beside decodes
    PREFILL_ONLY = "prefill_only"  # prefill chunks, no decode


@dataclass(frozen=True)
class CalibrationKey:
    kind: StepKind
    prefix_bucket: int  # 0 for DECODE_ONLY
    chunk_bucket: int = 0  # 0 for DECODE_ONLY

    def label(self) -> str:
        if self.kind is StepKind.DECODE_ONLY:
            return self.kind.value
        return f"{self.kind.value}/{self.prefix_bucket}/{self.chunk_bucket}"

    def distance(self, other: CalibrationKey) -> tuple[int, int, int, int]:
        """How far `other` is as a stand-in for this key (smaller is nearer; see the module
        docstring's fallback)."""
        chunk_steps = abs(other.chunk_bucket - self.chunk_bucket)
        prefix_steps = abs(other.prefix_bucket - self.prefix_bucket)
        return prefix_steps + chunk_steps, chunk_steps, other.prefix_bucket, other.chunk_bucket


@dataclass(frozen=True)
class CalibrationConfig:
    window_steps: int = 32  # samples per key the quantile runs over
    quantile: float = 0.98  # of the measured / predicted ratios: the correction applied
    min_samples: int = 8  # a key's correction applies from this many samples on
    skip_first_steps: int = 8  # ignored at start: compiles, graph capture, cold caches
    min_factor: float = 0.5  # the correction is clipped to [min_factor, max_factor]
    max_factor: float = 2.0
    prefix_bucket_tokens: int = 4096  # bucket 1 starts here; each next bucket doubles
    chunk_bucket_tokens: int = 32  # chunks up to this are bucket 0; each next bucket doubles

    def validate(self) -> None:
        if not 1 <= self.min_samples <= self.window_steps:
            raise ValueError(
                f"need 1 <= min_samples <= window_steps, got {self.min_samples}, {self.window_steps}"
            )
        if self.skip_first_steps < 0 or self.prefix_bucket_tokens < 1 or self.chunk_bucket_tokens < 1:
            raise ValueError(
                "skip_first_steps must be >= 0, prefix_bucket_tokens and chunk_bucket_tokens >= 1"
            )
        if not 0.0 <= self.quantile <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {self.quantile}")
        if not 0 < self.min_factor <= 1 <= self.max_factor:
            raise ValueError(
                f"need 0 < min_factor <= 1 <= max_factor, got {self.min_factor}, {self.max_factor}"
            )


def prefix_bucket(prefix_tokens: int, bucket_tokens: int) -> int:
    """0 below `bucket_tokens`, then one more per doubling (the module docstring's key)."""
    return (prefix_tokens // bucket_tokens).bit_length()


def chunk_bucket(chunk_tokens: int, bucket_tokens: int) -> int:
    """0 up to `bucket_tokens`, then one more per doubling (the module docstring's key)."""
    return ((max(chunk_tokens, 1) - 1) // bucket_tokens).bit_length()


def calibration_key(composition: StepComposition, config: CalibrationConfig) -> CalibrationKey:
    """A step's key (the module docstring)."""
    if not any(g.num_chunks for g in composition.groups):
        return CalibrationKey(StepKind.DECODE_ONLY, 0)
    prefix = max(g.chunk_prefix_tokens for g in composition.groups)
    chunk = max(c for g in composition.groups for c, _ in g.chunk_shapes)
    with_decodes = any(g.num_decodes for g in composition.groups)
    return CalibrationKey(
        StepKind.WITH_CHUNK if with_decodes else StepKind.PREFILL_ONLY,
        prefix_bucket(prefix, config.prefix_bucket_tokens),
        chunk_bucket(chunk, config.chunk_bucket_tokens),
    )


class _Window:
    """The last n values and their q-quantile, kept current on every add; it interpolates
    linearly between the sorted values, so q = 0.5 is the median."""

    def __init__(self, n: int, quantile: float) -> None:
        self.values: deque[float] = deque(maxlen=n)
        self.quantile = quantile
        self.level = 0.0  # the q-quantile

    def add(self, x: float) -> None:
        self.values.append(x)
        ordered = sorted(self.values)
        pos = self.quantile * (len(ordered) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(ordered) - 1)
        self.level = ordered[lo] + (pos - lo) * (ordered[hi] - ordered[lo])

    def __len__(self) -> int:
        return len(self.values)


class OnlineCalibration:
    def __init__(self, config: CalibrationConfig | None = None, num_stages: int = 1) -> None:
        """`num_stages`: the pipeline's stages (spp); with 1 the device runs one micro-batch at
        a time, however many are in flight."""
        if num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {num_stages}")
        self.config = config or CalibrationConfig()
        self.config.validate()
        self.num_stages = num_stages
        self._log_ratios: dict[CalibrationKey, _Window] = {}
        self._all = _Window(self.config.window_steps, self.config.quantile)
        self._host = _Window(self.config.window_steps, 0.5)  # the median
        self._last_done_s: float | None = None
        self._num_seen = 0
        self._factors: dict[CalibrationKey, float] = {}  # cache, cleared on every sample

    # ---- in ----------------------------------------------------------------------------

    def key(self, composition: StepComposition) -> CalibrationKey:
        return calibration_key(composition, self.config)

    def observe(
        self, composition: StepComposition, predicted_s: float, submitted_s: float, done_s: float
    ) -> None:
        """A processed micro-batch: its uncorrected prediction, when it was submitted and when
        its result came back (one clock, seconds). Call in completion order."""
        last, self._last_done_s = self._last_done_s, done_s
        self._num_seen += 1
        if self._num_seen <= self.config.skip_first_steps or predicted_s <= 0:
            return
        if last is not None:
            self._host.add(max(0.0, submitted_s - last))
        if self.num_stages > 1 and last is not None and submitted_s < last:
            ratio = (done_s - last) * self.num_stages / predicted_s  # one stage time of a full pipeline
        else:
            started_s = submitted_s if last is None else max(submitted_s, last)
            ratio = (done_s - started_s) / predicted_s
        if not 1 / MAX_PLAUSIBLE_RATIO <= ratio <= MAX_PLAUSIBLE_RATIO:
            return
        key = self.key(composition)
        window = self._log_ratios.get(key)
        if window is None:
            window = self._log_ratios[key] = _Window(self.config.window_steps, self.config.quantile)
        window.add(math.log(ratio))
        self._all.add(math.log(ratio))
        self._factors.clear()

    # ---- out ---------------------------------------------------------------------------

    def factor(self, key: CalibrationKey) -> float:
        f = self._factors.get(key)
        if f is None:
            f = self._factors[key] = self._factor(key)
        return f

    @property
    def host_s(self) -> float:
        return self._host.level if len(self._host) >= self.config.min_samples else 0.0

    def corrected_s(self, composition: StepComposition, predicted_s: float) -> float:
        return self.factor(self.key(composition)) * predicted_s + self.host_s

    def snapshot(self) -> dict[str, float | int]:
        """The corrections now, by key label (for logs and metrics), the host time, the samples in
        the window over all keys and the steps observed (warm-up and dropped ones included)."""
        out: dict[str, float | int] = {
            k.label(): self.factor(k) for k in sorted(self._log_ratios, key=_order)
        }
        out["host_s"] = self.host_s
        out["num_samples"] = len(self._all)
        out["num_observed"] = self._num_seen
        return out

    def _factor(self, key: CalibrationKey) -> float:
        warm = self.config.min_samples
        own = self._log_ratios.get(key)
        if own is not None and len(own) >= warm:
            log_factor = own.level
        else:
            same_kind = [k for k, w in self._log_ratios.items() if k.kind is key.kind and len(w) >= warm]
            if same_kind:
                log_factor = self._log_ratios[min(same_kind, key=key.distance)].level
            else:
                log_factor = self._all.level if len(self._all) >= warm else 0.0
            if own is not None:  # its first samples: never below the largest of them
                log_factor = max(log_factor, max(own.values))
        return min(max(math.exp(log_factor), self.config.min_factor), self.config.max_factor)


def _order(key: CalibrationKey) -> tuple[str, int, int]:
    return key.kind.value, key.prefix_bucket, key.chunk_bucket


class CalibratedLatencyModel:
    """`base`'s prediction with the run's correction applied (what adaptive chunking sizes by)."""

    def __init__(self, base: LatencyModel, calibration: OnlineCalibration) -> None:
        self.base = base
        self.calibration = calibration
        self.layout = base.layout

    def step_time_s(self, composition: StepComposition) -> float:
        return self.calibration.corrected_s(composition, self.base.step_time_s(composition))
