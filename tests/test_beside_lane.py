"""The steps' latency model beside a prefill lane chunk (latency/beside_lane.py): the chunks'
compute, the decodes' weight and key reads each scaled by the SMs left, the learned scale,
and the split a chunk leaves the steps, or the hold, against a fake base model."""

from __future__ import annotations

import pytest
from test_prefill_lane import MS, KeysModel, decodes, keys_compute_s

from mnemosyne.latency.beside_lane import (
    E_CHUNKS,
    E_KEYS,
    E_KEYS_BOXES,
    E_WEIGHTS,
    LANE_DECODES_HEADROOM,
    LANE_STEP_HEADROOM,
    SCALE_WEIGHT,
    BesideLaneLatencyModel,
    confined_keys_rate,
    lane_chunk_alone_s,
)
from mnemosyne.latency.composition import GroupLoad, StepComposition

# KeysModel: 2 ms + 1 us per decode key + 0.1 ms per chunk token; of the 2 ms, 1.5 weights
WEIGHTS_S = 1.5 * MS


def model(weights_rate: float = E_WEIGHTS, keys_rate: float = E_KEYS) -> BesideLaneLatencyModel:
    return BesideLaneLatencyModel(
        KeysModel(scale=1.5), KeysModel(), WEIGHTS_S, keys_compute_s, weights_rate, keys_rate
    )


def test_each_part_scales_at_its_own_rate():
    m = model()
    d = decodes(32, 1000)  # base: 0.5 fixed + 1.5 weights + 32 keys = 34 ms
    assert m.step_time_s(d) == pytest.approx(51 * MS)  # every SM: the (calibrated) inner model
    m.steps_share = 16 / 128
    confined = 0.5 * MS + 1.5 * MS * 8 / E_WEIGHTS + 32 * MS * 8 / E_KEYS
    assert m.confined_s(d, 16 / 128) == pytest.approx(confined)
    assert m.step_time_s(d) == pytest.approx(confined / LANE_STEP_HEADROOM)  # planned with headroom
    with_chunk = StepComposition.single(d.groups[0].plus_chunk(100, 500))  # + 8 ms of FLOPs at the peaks
    assert m.confined_s(with_chunk, 16 / 128) == pytest.approx(confined + 8 * MS * 8 / E_CHUNKS)
    # on 3/4 of the SMs the weights stream as fast as on all of them, the keys do not
    assert m.confined_s(d, 0.75) == pytest.approx(2 * MS + 32 * MS / (0.75 * E_KEYS))


def test_weights_beyond_the_keyless_step_are_capped():
    m = BesideLaneLatencyModel(
        KeysModel(), KeysModel(), 5 * MS, keys_compute_s
    )  # more than the 2 ms keyless step
    assert m.confined_s(decodes(1, 0), 16 / 128) == pytest.approx(2 * MS * 8 / E_WEIGHTS)


def test_a_chunk_without_decodes_reads_the_weights_as_a_decode_step_does():
    """A step of chunks only still reads the weights and pays the fixed costs (its frame: one
    row without keys), at their rates; the chunks take their FLOPs at E_CHUNKS times the SMs'
    share of the peaks, or their time on every SM where that is longer (launches, latency)."""
    m = model()
    chunk_only = StepComposition.single(GroupLoad().plus_chunk(100, 500))  # base: 2 ms + 10 ms of chunk
    frame = 0.5 * MS + 1.5 * MS * 8 / E_WEIGHTS  # on 16 of 128 SMs
    assert m.confined_s(chunk_only, 16 / 128) == pytest.approx(frame + 8 * MS * 8 / E_CHUNKS)  # 8 ms of FLOPs
    # on 120 of 128 SMs the FLOPs take 8.1 ms, less than the chunk's 10 ms on every SM
    assert m.confined_s(chunk_only, 120 / 128) == pytest.approx(2 * MS + 10 * MS)
    rated = BesideLaneLatencyModel(KeysModel(), KeysModel(), WEIGHTS_S, keys_compute_s, chunks_rate=2.0)
    assert rated.confined_s(chunk_only, 16 / 128) == pytest.approx(frame + 8 * MS * 4)


def test_the_scale_is_learned_from_decode_steps_only():
    m = model()
    d = decodes(32, 1000)
    share = 16 / 128
    for _ in range(200):  # the device: 1.3x the model
        m.observe(d, share, 1.3 * m.confined_s(d, share) / m.scale)
    assert m.scale == pytest.approx(1.3, rel=1e-3)
    before = m.scale
    m.observe(StepComposition.single(d.groups[0].plus_chunk(100, 500)), share, 1.0)  # a chunk: k's, not m's
    m.observe(decodes(0, 0), share, 1.0)  # no decode: not learned
    assert m.scale == before
    m.observe(d, share, m.confined_s(d, share) * 1.1 / 1.3)  # 1.1x the unscaled model
    assert m.scale == pytest.approx(before + SCALE_WEIGHT * (1.1 - before))


def test_steps_with_decodes_and_chunks_learn_a_scale_per_split():
    """k(S): steps with decodes and a chunk on 24 SMs that run 1.2x the model scale the
    predictions of such steps on 24 SMs only: not on 16, not decode-only steps, not steps of
    chunks alone (which are not learned from)."""
    m = model()
    d = decodes(32, 1000)
    mixed = StepComposition.single(d.groups[0].plus_chunk(100, 500))
    chunk_only = StepComposition.single(GroupLoad().plus_chunk(100, 500))
    on16, on24 = 16 / 128, 24 / 128
    before = {(c, s): m.confined_s(c, s) for c in (d, mixed, chunk_only) for s in (on16, on24)}
    m.observe(mixed, on24, 1.2 * before[mixed, on24])
    assert m.chunk_scales == {on24: pytest.approx(1 + SCALE_WEIGHT * 0.2)}
    for _ in range(200):
        m.observe(mixed, on24, 1.2 * before[mixed, on24])
        m.observe(chunk_only, on16, 5.0)  # no decode: no token waits, not learned
    assert m.confined_s(mixed, on24) == pytest.approx(1.2 * before[mixed, on24], rel=1e-3)
    assert m.confined_s(mixed, on16) == pytest.approx(before[mixed, on16])
    assert m.confined_s(d, on24) == pytest.approx(before[d, on24])  # the decodes' split is m's alone
    assert m.confined_s(chunk_only, on24) == pytest.approx(before[chunk_only, on24])
    assert m.scale == 1.0


def test_fewest_sms_that_fit_the_target_or_the_hold():
    m = model(2.5, 1.05)  # the rates of the arithmetic below
    choices, num_sms, target = (16, 24, 32), 128, 30 * MS
    assert LANE_DECODES_HEADROOM * target == pytest.approx(28.5 * MS)
    # 2 decodes of 1000 keys: 0.5 + 1.5 x 8 / 2.5 + 2 x 8 / 1.05 = 20.5 ms on 16 SMs
    assert m.fewest_sms(decodes(2, 1000), num_sms, choices, target) == 16
    # 3: 28.2 ms on 16 SMs, within the decodes' headroom (not within a step's with chunks, 27 ms)
    assert m.confined_s(decodes(3, 1000), 16 / num_sms) > LANE_STEP_HEADROOM * target
    assert m.fewest_sms(decodes(3, 1000), num_sms, choices, target) == 16
    # 4 of them: 35.8 ms on 16, 24.0 on 24
    assert m.fewest_sms(decodes(4, 1000), num_sms, choices, target) == 24
    # 8: 33.4 ms on 32 SMs, but 10 ms on every SM: the lane holds
    assert m.fewest_sms(decodes(8, 1000), num_sms, choices, target) is None
    # 38: 40 ms even on every SM: the most SMs
    assert m.fewest_sms(decodes(38, 1000), num_sms, choices, target) == 32
    assert m.fewest_sms(decodes(0, 0), num_sms, choices, target) == 16  # no decode: no gap to keep


def test_a_short_lane_chunk_is_timed_with_its_padding_rows():
    """The worker pads a prompt's last, shorter lane chunk to the lane's rows: the engine's step
    log and the simulator time it as its own attention plus the padding rows' row-wise work."""
    base = KeysModel()  # 2 ms + 0.1 ms per chunk token
    short = StepComposition.single(GroupLoad().plus_chunk(100, 500))
    assert lane_chunk_alone_s(base, short, 160) == pytest.approx(12 * MS + 6 * MS)  # + 60 rows' 0.1 ms
    assert lane_chunk_alone_s(base, short, 100) == pytest.approx(12 * MS)  # a whole chunk: no padding
    assert lane_chunk_alone_s(base, short, 0) == pytest.approx(12 * MS)  # no lane size: as scheduled


def test_the_keys_rate_follows_the_decode_launch_on_a_split():
    """TMA boxes (16-bit, head dim over 64 a power of two, pages of whole 64-key boxes) read
    the keys faster per confined SM than pointer gathers (decode_launch.launch_options)."""
    assert confined_keys_rate(128, 2, 64) == confined_keys_rate(128, 2, 256) == E_KEYS_BOXES > E_KEYS
    assert confined_keys_rate(64, 2, 64) == E_KEYS  # head dim 64: its own launch
    assert confined_keys_rate(128, 4, 64) == E_KEYS  # float32
    assert confined_keys_rate(128, 2, 16) == E_KEYS  # pages smaller than a box
    assert confined_keys_rate(96, 2, 64) == E_KEYS  # no box of a head dim of 96
