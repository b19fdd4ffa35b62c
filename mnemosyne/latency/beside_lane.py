"""A step's time on the S of a device's N SMs that a prefill lane chunk leaves it
(engine/prefill_lane.py draws the lane), from the base model's time of it on every SM::

    F = the step's frame: its decodes, or with none one row without keys (every step reads
        the weights and pays its fixed costs, chunks or not)
    C = base(the step) - base(F)                the chunks' own work on every SM
    X = compute(the step) - compute(F)          the chunks' FLOPs at the device's peaks
                                                (`roofline.compute_s`)
    D = base(F), split in three:
        keys    = D - base(F without its keys)                 K/V reads of the decode kernel
        weights = min(the weights' read at full bandwidth, D - keys)   the GEMMs' weight reads
        fixed   = the rest                                      launches and latency: no faster on more SMs
    on S SMs:  m * (fixed + weights * f(E_WEIGHTS) + keys * f(E_KEYS)) + max(C, X * f(E_CHUNKS))
    f(e) = max(1, N / (S * e)): a confined SM moves e times an average SM's share of the
           whole device's bandwidth (which it cannot fill on its own), or computes at e times
           an average SM's share of its peak FLOPs
    m: measured / modelled, a running mean over the decode-only steps beside the lane (prior 1)
    k(S): measured / modelled of the steps with decodes and chunks on S SMs, a running mean per
          split (prior 1), times the whole prediction of such a step

The chunks' time on S SMs is their FLOPs there, not their time on every SM scaled: a short
chunk's time on every SM is mostly launches and latency (32 tokens: 1.8 ms of which 0.7 are
FLOPs, 8B), which do not grow on fewer SMs, and a long one's is its FLOPs. Their prefix
reads are not scaled (the chunks beside a lane chunk are short prompts' prefills).

Beside a lane chunk the chunk policy plans a step within LANE_STEP_HEADROOM of its target
(`step_time_s` is the prediction over it): the steps with decodes and a chunk beside a chunk
took up to 1.10x the prediction at p98 (8B serving trace, twenty-sixth session), and m learns
a mean, where the whole-GPU model is calibrated at the target's quantile. The split is chosen
for the decodes alone within LANE_DECODES_HEADROOM: decode-only steps beside a chunk vary
less, their p99 within 1.03-1.045x their p50 at each context (8B mixed scenario, 16 SMs,
thirty-first session), and every SM more for the steps is one fewer for the lane (its chunks
took ~8% longer with 24 SMs left to the steps than with 16).

k(S) because the chunks' rate is not one number: in the 8B serving trace (thirty-second
session) the steps with decodes and a short prompt's chunk took a median 1.00x the model on 16
SMs, 1.17x (p90 1.42x) on 24 and 1.08x on 32; the few on 24, planned within 27 ms, took up to
37.8 ms.

The two rates are fitted (`benchmarks/beside_lane_fit.py`) on the H200 step logs of the lane:
the decode-only steps beside a chunk on 16, 24 or 32 SMs of three 8B runs (the serving trace
twice, the mixed scenario with the decode kernel's launch options for a split) and the 1B
mixed scenario (benchmarks/results/README.md, "Twenty-fifth session", "Twenty-sixth
session"). The weights stream at 2.5x an average SM's share of the device's bandwidth, and
the decode kernel's keys at 1.2x (1.05x with the whole-GPU launch options) where it gathers
them by pointers, and at 1.7x where it loads them as TMA boxes (`E_KEYS_BOXES`: the 8B mixed
scenario on that launch, twenty-ninth session, median / p90 error 2.0% / 4.4%). Median errors
per run are 1.2-5.3%; one rate for the whole step (the model before) was off by 5-63%. A step
of a few short decodes (mostly weights) took 13.9 ms on 16 SMs, and one over 351K keys
(mostly keys) took 54 ms on 32. The chunks compute at 1.05x an average SM's share of the
peak FLOPs (the 8B serving traces' steps with a short prompt's chunk of 7-256 tokens beside a
lane chunk: median error 4.4-6.0%, p90 10-13%; their time on every SM scaled at one rate, the
model before, was off by 7-9% at the median and 18-27% at p90 with the best rate).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from mnemosyne.kernels.host_math import confined_decode_boxes
from mnemosyne.latency.composition import GroupLoad, StepComposition
from mnemosyne.latency.model import LatencyModel

LANE_STEP_HEADROOM = 0.9  # a step beside a lane chunk is planned within this fraction of its target
LANE_DECODES_HEADROOM = 0.95  # ... and the decodes alone fit this fraction on the split `fewest_sms` picks
E_WEIGHTS = 2.5  # the weights' reads on a confined SM, against an average SM of the whole device
E_KEYS = 1.2  # the decode kernel's K/V reads by pointers, likewise (`LAUNCH_16BIT_CONFINED_POINTERS`)
E_KEYS_BOXES = 1.7  # ... as TMA boxes (`decode_launch.LAUNCH_16BIT_CONFINED`)
E_CHUNKS = 1.05  # the chunks' FLOPs, against an average SM's share of the device's peak
SCALE_WEIGHT = 0.1  # the running mean's weight of each measured step


def step_frame(composition: StepComposition, with_keys: bool = True) -> StepComposition:
    """The frame of a (one-group) step (module docstring): its decodes without its chunks
    (and without their keys), or one row without keys when it has no decode."""
    (g,) = composition.groups
    num_rows = max(1, g.num_decodes)
    return StepComposition.single(
        GroupLoad(
            num_tokens=num_rows,
            num_decodes=num_rows,
            decode_kv_tokens=g.decode_kv_tokens if with_keys else 0,
            max_decode_kv_tokens=g.max_decode_kv_tokens if with_keys else 0,
            num_sampled=max(1, min(g.num_sampled, g.num_decodes)),
        )
    )


def confined_keys_rate(head_dim: int, dtype_bytes: int, block_size: int) -> float:
    """The decode kernel's K/V rate on a lane split for this model and cache: E_KEYS_BOXES
    where its launch there loads TMA boxes (`host_math.confined_decode_boxes`), else E_KEYS."""
    return E_KEYS_BOXES if confined_decode_boxes(head_dim, dtype_bytes, block_size) else E_KEYS


def _slowdown(steps_share: float, rate: float) -> float:
    return max(1.0, 1.0 / (steps_share * rate))


class BesideLaneLatencyModel:
    """`inner`'s prediction while the steps have every SM; beside a lane chunk, on a share of
    them (`steps_share` = S / N, set by the lane's driver), `base`'s split and scaled as the
    module docstring draws. `base` is the model before online calibration, which learns only
    from steps with the GPU to themselves; `weights_s` is the weights' read at the device's
    full bandwidth (`roofline.weights_read_s`) and `compute_s` a load's FLOPs at its peaks
    (`roofline.compute_s`); the rates are E_WEIGHTS, E_KEYS and E_CHUNKS unless given
    (`benchmarks/beside_lane_fit.py` fits them)."""

    def __init__(
        self,
        inner: LatencyModel,
        base: LatencyModel,
        weights_s: float,
        compute_s: Callable[[GroupLoad], float],
        weights_rate: float = E_WEIGHTS,
        keys_rate: float = E_KEYS,
        chunks_rate: float = E_CHUNKS,
    ) -> None:
        self.inner = inner
        self.base = base
        self.weights_s = weights_s
        self.compute_s = compute_s
        self.weights_rate = weights_rate
        self.keys_rate = keys_rate
        self.chunks_rate = chunks_rate
        self.layout = inner.layout
        self.steps_share: float | None = None  # the steps' share of the SMs now; None: all of them
        self.scale = 1.0  # m
        self.chunk_scales: dict[float, float] = {}  # k(S), by the steps' share S / N

    def step_time_s(self, composition: StepComposition) -> float:
        """The time to plan a step against: `inner`'s on every SM; beside a lane chunk the
        prediction over LANE_STEP_HEADROOM (module docstring)."""
        if self.steps_share is None:
            return self.inner.step_time_s(composition)
        return self.confined_s(composition, self.steps_share) / LANE_STEP_HEADROOM

    def confined_s(self, composition: StepComposition, steps_share: float) -> float:
        """Predicted seconds of a step on `steps_share` of the SMs beside a lane chunk."""
        whole_s = self.base.step_time_s(composition)
        if not composition.groups[0].num_chunks:
            return self.scale * self._decodes_s(composition, whole_s, steps_share)
        frame = step_frame(composition)
        frame_s = self.base.step_time_s(frame)
        chunks_s = max(0.0, whole_s - frame_s)
        flops_s = max(0.0, self.compute_s(composition.groups[0]) - self.compute_s(frame.groups[0]))
        chunks_s = max(chunks_s, flops_s * _slowdown(steps_share, self.chunks_rate))
        step_s = self.scale * self._decodes_s(frame, frame_s, steps_share) + chunks_s
        if composition.groups[0].num_decodes:
            step_s *= self.chunk_scales.get(steps_share, 1.0)
        return step_s

    def _decodes_s(self, decodes: StepComposition, decodes_s: float, steps_share: float) -> float:
        """The decodes' step (`decodes_s` on every SM) on `steps_share` of the SMs, before m."""
        keyless_s = min(decodes_s, self.base.step_time_s(step_frame(decodes, with_keys=False)))
        keys_s = decodes_s - keyless_s
        weights_s = min(self.weights_s, keyless_s)
        fixed_s = keyless_s - weights_s
        weights_s *= _slowdown(steps_share, self.weights_rate)
        return fixed_s + weights_s + keys_s * _slowdown(steps_share, self.keys_rate)

    def observe(self, composition: StepComposition, steps_share: float, measured_s: float) -> None:
        """A step that ran on `steps_share` of the SMs beside a lane chunk took `measured_s`:
        a decode-only step teaches m, one with decodes and chunks k(its share) (steps of chunks
        alone keep no token waiting, and are not learned from)."""
        g = composition.groups[0]
        if not g.num_decodes or measured_s <= 0:
            return
        if g.num_chunks:
            k = self.chunk_scales.get(steps_share, 1.0)
            modelled_s = self.confined_s(composition, steps_share) / k
            self.chunk_scales[steps_share] = k + SCALE_WEIGHT * (measured_s / modelled_s - k)
            return
        modelled_s = self._decodes_s(composition, self.base.step_time_s(composition), steps_share)
        if modelled_s > 0:
            self.scale += SCALE_WEIGHT * (measured_s / modelled_s - self.scale)

    def fewest_sms(
        self, decodes: StepComposition, num_sms: int, choices: Sequence[int], target_s: float
    ) -> int | None:
        """The fewest SMs of `choices` on which a step of `decodes` is predicted to fit
        LANE_DECODES_HEADROOM x `target_s`. None when none does but every SM would: the lane
        holds (the decodes need the whole device: one of 351K keys took 54 ms on 32 SMs
        beside a chunk, 16 ms alone). The most of them when not even every SM would fit; the
        fewest with no decode."""
        if not decodes.groups[0].num_decodes:  # no token gap to keep
            return min(choices)
        bound_s = LANE_DECODES_HEADROOM * target_s
        for steps_sms in sorted(choices):
            if self.confined_s(decodes, steps_sms / num_sms) <= bound_s:
                return steps_sms
        return None if self.base.step_time_s(decodes) <= bound_s else max(choices)


def lane_chunk_alone_s(model: LatencyModel, composition: StepComposition, chunk_tokens: int) -> float:
    """A prefill lane chunk's predicted seconds by itself on every SM of its one device: its
    composition's time, plus for one of fewer rows than the lane's `chunk_tokens` (the worker
    pads it to them, worker/prefill_lane.py) the padding rows' row-wise work, time(T rows
    after no key) - time(its rows after no key): they attend to nothing of their own.
    The engine's step log and the simulator's virtual lane both time lane chunks by it."""
    alone_s = model.step_time_s(composition)
    (g,) = composition.groups
    if g.num_tokens < chunk_tokens:
        padded_s = model.step_time_s(StepComposition.single(GroupLoad().plus_chunk(chunk_tokens, 0)))
        unpadded_s = model.step_time_s(StepComposition.single(GroupLoad().plus_chunk(g.num_tokens, 0)))
        alone_s += max(0.0, padded_s - unpadded_s)
    return alone_s
