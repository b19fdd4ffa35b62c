"""Online calibration of the latency model (fake models and clocks; seconds, tokens), the
minimum-progress rule of adaptive chunking, and the simulator with a known model error."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable

import pytest
from test_adaptive_scheduling import FakeLatencyModel, adaptive_sched
from test_scheduler import make_req, make_sched, step
from test_simulator import LLAMA3_8B, LLAMA32_1B, write_config

from mnemosyne.engine.adaptive_chunking import AdaptiveChunkPolicy
from mnemosyne.engine.args import EngineArgs
from mnemosyne.engine.step_load import step_composition
from mnemosyne.latency.calibration import (
    CalibratedLatencyModel,
    CalibrationConfig,
    CalibrationKey,
    OnlineCalibration,
    StepKind,
)
from mnemosyne.latency.composition import GroupLoad, StepComposition
from mnemosyne.simulator.engine import SimulatedEngine, scaled_timer
from mnemosyne.simulator.setup import device_spec, latency_model_for, simulated_engine_config

MS = 1e-3
DECODES = StepComposition.single(GroupLoad().plus_decode(1000).plus_decode(1000))


def chunk_at(prefix_tokens: int, num_tokens: int = 64) -> StepComposition:
    return StepComposition.single(GroupLoad().plus_decode(1000).plus_chunk(num_tokens, prefix_tokens))


def feed(cal: OnlineCalibration, comp: StepComposition, predicted_s: float, ratio: float, n: int,
         start_s: float = 0.0, host_s: float = 0.0) -> float:  # fmt: skip
    """n back-to-back steps measuring ratio x predicted, host_s apart; returns the last done time."""
    t = start_s
    for _ in range(n):
        submitted = t + host_s
        t = submitted + ratio * predicted_s
        cal.observe(comp, predicted_s, submitted, t)
    return t


def small_cal(**kw) -> OnlineCalibration:
    """A short window; the median (quantile 0.5) unless told, so a constant ratio is its factor."""
    defaults = {"window_steps": 16, "min_samples": 5, "skip_first_steps": 3, "quantile": 0.5}
    return OnlineCalibration(CalibrationConfig(**(defaults | kw)))


def test_converges_to_a_known_bias_after_warm_up():
    cal = small_cal()
    comp = chunk_at(10_000)
    t = feed(cal, comp, 20 * MS, 3.0, 3)  # the first steps (compiles) are ignored
    assert cal.factor(cal.key(comp)) == 1.0  # nothing seen: no correction
    t = feed(cal, comp, 20 * MS, 1.1, 2, t)
    t = feed(cal, comp, 20 * MS, 1.3, 1, t)
    t = feed(cal, comp, 20 * MS, 1.0, 1, t)
    assert cal.factor(cal.key(comp)) == pytest.approx(1.3)  # 4 < min_samples: its largest so far
    t = feed(cal, comp, 20 * MS, 1.3, 1, t)
    assert cal.factor(cal.key(comp)) == pytest.approx(1.1)  # warm: the quantile (the median here)
    feed(cal, comp, 20 * MS, 1.3, 2, t)
    assert cal.corrected_s(comp, 10 * MS) == pytest.approx(13 * MS)
    assert CalibratedLatencyModel(FakeLatencyModel(), cal).step_time_s(comp) == pytest.approx(
        1.3 * FakeLatencyModel().step_time_s(comp)
    )


def test_outliers_are_ignored_and_a_lasting_shift_is_followed():
    cal = small_cal()
    comp = chunk_at(10_000)
    t = feed(cal, comp, 20 * MS, 1.0, 3)
    t = feed(cal, comp, 20 * MS, 1.2, 10, t)
    t = feed(cal, comp, 20 * MS, 5.0, 5, t)  # stalls: fewer than half the window
    t = feed(cal, comp, 20 * MS, 50.0, 3, t)  # implausible: dropped outright
    assert cal.factor(cal.key(comp)) == pytest.approx(1.2)
    assert cal.snapshot()["num_samples"] == 15
    feed(cal, comp, 20 * MS, 0.9, 12, t)  # clocks changed for good: followed within the window
    assert cal.factor(cal.key(comp)) == pytest.approx(0.9)


def test_default_quantile_covers_most_steps_not_half():
    """Noisy steps (ratios 0.95-1.15 round-robin): the median would leave half of the
    full-budget steps over the target; the default 0.98 quantile leaves about one in fifty
    (here the largest of 20), a 0.9 quantile about a tenth."""
    ratios = [0.95 + 0.2 * i / 19 for i in range(20)]
    for quantile, num_over in ((None, 1), (0.9, 2)):
        config = CalibrationConfig(window_steps=20, min_samples=5, skip_first_steps=0)
        if quantile is not None:
            config = dataclasses.replace(config, quantile=quantile)
        cal = OnlineCalibration(config)
        q = cal.config.quantile
        assert quantile is not None or q == 0.98
        t = 0.0
        for r in ratios:
            t = feed(cal, DECODES, 10 * MS, r, 1, t)
        f = cal.factor(cal.key(DECODES))
        assert f == pytest.approx(0.95 + 0.2 * q, rel=1e-3)  # interpolated (in log space) between sorted ratios
        assert sum(r > f for r in ratios) == num_over
    median = small_cal(window_steps=20, skip_first_steps=0)
    t = 0.0
    for r in ratios:
        t = feed(median, DECODES, 10 * MS, r, 1, t)
    assert median.factor(median.key(DECODES)) == pytest.approx(1.05, rel=1e-3)
    with pytest.raises(ValueError, match="quantile"):
        CalibrationConfig(quantile=1.5).validate()


def test_factor_is_clipped():
    cal = small_cal(max_factor=1.5, min_factor=0.75)
    feed(cal, DECODES, 10 * MS, 3.0, 10)
    assert cal.factor(cal.key(DECODES)) == 1.5
    cal = small_cal(max_factor=1.5, min_factor=0.75)
    feed(cal, DECODES, 10 * MS, 0.3, 10)
    assert cal.factor(cal.key(DECODES)) == 0.75


def test_step_kinds_and_prefix_buckets_are_separate_with_nearest_fallback():
    cal = small_cal(skip_first_steps=0)
    assert cal.key(DECODES) == CalibrationKey(StepKind.DECODE_ONLY, 0)
    assert cal.key(chunk_at(100)).prefix_bucket == 0
    assert cal.key(chunk_at(4096)).prefix_bucket == 1
    assert cal.key(chunk_at(300_000)).prefix_bucket == 7  # [256K, 512K)
    buckets = {c: cal.key(chunk_at(1000, c)).chunk_bucket for c in (1, 32, 33, 64, 65, 128, 129)}
    assert buckets == {1: 0, 32: 0, 33: 1, 64: 1, 65: 2, 128: 2, 129: 3}
    t = feed(cal, DECODES, 10 * MS, 0.9, 6)
    t = feed(cal, chunk_at(1000), 30 * MS, 1.4, 6, t)  # short prefixes: under-predicted
    t = feed(cal, chunk_at(300_000), 30 * MS, 0.8, 6, t)  # long prefixes: over-predicted
    assert cal.factor(cal.key(DECODES)) == pytest.approx(0.9)
    assert cal.factor(cal.key(chunk_at(1000))) == pytest.approx(1.4)
    assert cal.factor(cal.key(chunk_at(8000))) == pytest.approx(1.4)  # nearest warm: bucket 0
    assert cal.factor(cal.key(chunk_at(200_000))) == pytest.approx(0.8)  # nearest warm: bucket 7
    assert cal.factor(cal.key(chunk_at(300_000, 32))) == pytest.approx(0.8)  # nearest: other chunk bucket
    assert set(cal.snapshot()) == {"decode_only", "with_chunk/0/1", "with_chunk/7/1", "host_s", "num_samples",
                                   "num_observed"}  # fmt: skip


def test_prompt_only_steps_are_a_kind_of_their_own():
    """A prompt-only 64-token step measured 3x (a neighbour's time logged on it) does not
    raise the factor that sizes 64-token chunks beside decodes, at the 0.98 quantile."""
    cal = small_cal(skip_first_steps=0, quantile=0.98)
    alone = StepComposition.single(GroupLoad().plus_chunk(64, 200_000))
    assert cal.key(alone) == CalibrationKey(StepKind.PREFILL_ONLY, 6, 1)
    assert cal.key(chunk_at(200_000)) == CalibrationKey(StepKind.WITH_CHUNK, 6, 1)
    t = feed(cal, chunk_at(200_000), 20 * MS, 1.1, 10)
    t = feed(cal, alone, 20 * MS, 3.0, 1, t)
    assert cal.factor(cal.key(chunk_at(200_000))) == pytest.approx(1.1)
    assert cal.factor(cal.key(alone)) == 2.0  # its first sample, 3x, clipped at max_factor
    assert "prefill_only/6/1" in cal.snapshot()


def test_host_gap_is_added_and_overlapped_steps_measure_their_own_time():
    cal = small_cal(skip_first_steps=0)
    feed(cal, DECODES, 10 * MS, 1.0, 6, host_s=2 * MS)
    assert cal.host_s == pytest.approx(2 * MS)
    assert cal.corrected_s(DECODES, 10 * MS) == pytest.approx(12 * MS)
    # async scheduling on one device: each step submitted 5 ms before the previous result,
    # so submit -> result is 15 ms, its own time 10 ms, and no host time shows between results
    cal = small_cal(skip_first_steps=0)
    t = 0.0
    for _ in range(8):
        cal.observe(DECODES, 10 * MS, t - 5 * MS, t + 10 * MS)
        t += 10 * MS
    assert cal.factor(cal.key(DECODES)) == pytest.approx(1.0)
    assert cal.host_s == 0.0
    # a pipeline of 2 stages: the first micro-batch crosses an empty pipeline (20 ms for a 10-ms
    # prediction: 2x); one submitted before the previous result is measured by the result gap,
    # one stage time, against half the prediction (10 ms gap, 5 ms share: 2x)
    cal = OnlineCalibration(CalibrationConfig(min_samples=1, skip_first_steps=0), num_stages=2)
    cal.observe(DECODES, 10 * MS, 0.0, 20 * MS)
    cal.observe(DECODES, 10 * MS, 5 * MS, 30 * MS)  # overlapped: the 10-ms gap
    assert cal.snapshot()["num_samples"] == 2 and cal.factor(cal.key(DECODES)) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="num_stages"):
        OnlineCalibration(num_stages=0)


def prefill_beside_a_decode(
    cal: OnlineCalibration, prompt_len: int, device_factor: Callable[[int], float]
) -> tuple[list[float], list[int], AdaptiveChunkPolicy]:
    """One request decoding, then a prompt of `prompt_len` tokens prefilled in adaptive chunks
    (3 ms target) sized by the fake model corrected by `cal`, on a device that takes
    device_factor(largest chunk's tokens) x the model's time: each step's true seconds and
    largest chunk, and the policy."""
    base = FakeLatencyModel()
    s, policy, _ = adaptive_sched(model=CalibratedLatencyModel(base, cal), budget=4096, max_model_len=16384,
                                  block_size=8, blocks=(2048,), target_s=3 * MS)  # fmt: skip
    s.add_request(make_req("d", 8, max_tokens=5000))
    step(s)
    s.add_request(make_req("long", prompt_len, max_tokens=1))
    true_s, sizes, t = [], [], 0.0
    while s.get_request("long") is not None:
        sched = s.schedule()
        comp = step_composition(s.kv_manager, sched)
        sizes.append(max(c.num_tokens for c in sched.chunks))
        true_s.append(device_factor(sizes[-1]) * base.step_time_s(comp))
        cal.observe(comp, base.step_time_s(comp), t, t + true_s[-1])
        t += true_s[-1]
        s.update_from_output(sched, {c.request.request_id: 5 for c in sched.chunks if c.sample})
    return true_s, sizes, policy


def test_adaptive_chunks_shrink_under_a_biased_model_once_calibrated():
    """The device runs 1.5x slower than the model: once calibrated, each step's true time
    (1.5 x the model's) fits the target, where the uncorrected chunks overshoot it."""
    cal = OnlineCalibration(CalibrationConfig(window_steps=8, min_samples=4, skip_first_steps=2))
    true_s, sizes, policy = prefill_beside_a_decode(cal, 6000, lambda _: 1.5)
    assert max(true_s[:2]) > 4 * MS  # uncalibrated: 1.5 x a 3 ms prediction
    assert sizes[0] > 2 * sizes[-2]
    assert max(true_s[6:]) <= 3 * MS * (1 + 1e-9)  # calibrated: within the target
    assert policy.num_overshoots == 0


def test_chunk_sizes_with_different_errors_do_not_alternate_over_the_target():
    """The device runs 32-token chunks at 1.1x the model and larger ones at 1.4x (as an H200
    ran 32- and 64-token chunks after 200K keys at 1.2x and 1.3x). With one window for both,
    the 32-token steps held the correction down, a larger chunk then fitted its corrected
    prediction, ran over the target, raised the correction for a while, and again: a chunk
    in eight over the target. With a window per chunk bucket only the warm-up overshoots."""
    cal = OnlineCalibration(CalibrationConfig(window_steps=16, min_samples=4, skip_first_steps=2))
    true_s, sizes, _ = prefill_beside_a_decode(cal, 8000, lambda size: 1.1 if size <= 32 else 1.4)
    assert max(sizes[40:70]) == 32 and min(sizes[40:70]) == 32  # where one window let 40 through
    warm = 6  # skip_first_steps + min_samples
    assert max(true_s[warm:]) <= 3 * MS * (1 + 1e-9)


def small_chunk_policy(target_s: float, block_size: int = 16) -> tuple:
    s = make_sched(budget=4096, max_model_len=4096, block_size=block_size, blocks=(4096 // block_size,))
    model = FakeLatencyModel(per_token_s=0.1 * MS)  # 1 ms + 0.1 ms per token (+ pairs)
    policy = AdaptiveChunkPolicy(model, s.kv_manager, target_s, granularity_tokens=32, min_chunk_tokens=32)
    s.chunk_policy = policy
    return s, policy


@pytest.mark.parametrize("block_size", [16, 64])  # the small granule is 16 tokens either way
def test_min_progress_takes_a_small_chunk_that_fits(block_size):
    s, policy = small_chunk_policy(3 * MS, block_size)  # 16 tokens: 2.6 ms fits; 32: 4.2 ms does not
    s.add_request(make_req("p", 100, max_tokens=1))
    out, _ = step(s)
    assert [c.num_tokens for c in out.chunks] == [16]
    assert policy.num_small_chunks == 1 and policy.num_overshoots == 0


def test_min_progress_overshoots_with_the_minimum_chunk_and_reports_once(caplog):
    s, policy = small_chunk_policy(2 * MS)  # even 16 tokens (2.6 ms) overshoot
    s.add_request(make_req("p", 100, max_tokens=1))
    with caplog.at_level(logging.WARNING, logger="mnemosyne.engine.adaptive_chunking"):
        sizes = [step(s)[0].chunks[0].num_tokens for _ in range(3)]
    assert sizes == [32, 32, 32]  # progress never stops: nothing starves
    assert policy.num_overshoots == 3 and policy.num_small_chunks == 0
    assert len([r for r in caplog.records if "over the 2.0 ms step target" in r.getMessage()]) == 1


# ---- the simulator with a known systematic error ------------------------------------------


def mixed_tbt_s(model_dir, error_factor: float, online_calibration: bool) -> list[float]:
    """8 short requests decode, then a 48K-token prompt prefills on a device error_factor x
    slower than the roofline: the short requests' gaps while it prefills (fcfs + adaptive)."""
    args = EngineArgs(model=str(model_dir), max_num_batched_tokens=8448, enable_prefix_caching=False,
                      chunk_policy="adaptive", chunk_size=None, tbt_slo_ms=30.0, kv_cache_memory_gb=20, max_model_len=65536,
                      online_calibration=online_calibration)  # fmt: skip
    spec = device_spec("h200")
    config = simulated_engine_config(model_dir, args, spec)
    model, source = latency_model_for(config, spec)
    sim = SimulatedEngine(config, model, source, step_timer=scaled_timer(model, error_factor))
    shorts = [f"s{i}" for i in range(8)]
    for rid in shorts:
        sim.add_request(rid, 1024, 4000)
    while any(len(sim.requests[r].token_times_s) < 2 for r in shorts):
        sim.step()
    arrival = sim.now_s
    sim.add_request("long", 49152, 1)
    while not sim.requests["long"].token_times_s:
        sim.step()
    first = sim.requests["long"].token_times_s[0]
    t = sim.requests["s0"].token_times_s
    return [b - a for a, b in zip(t, t[1:], strict=False) if a >= arrival and b <= first]


def test_simulated_error_is_corrected_by_calibration(tmp_path):
    model_dir = write_config(tmp_path, "llama3_8b", LLAMA3_8B)
    exact = mixed_tbt_s(model_dir, 1.0, online_calibration=True)  # measured == predicted: identity
    assert max(exact) <= 30 * MS * (1 + 1e-9)
    biased = mixed_tbt_s(model_dir, 1.3, online_calibration=False)
    assert max(biased) > 36 * MS  # the policy trusts the model: steps run 1.3 x the target
    calibrated = mixed_tbt_s(model_dir, 1.3, online_calibration=True)
    warm = CalibrationConfig().skip_first_steps + CalibrationConfig().min_samples
    assert max(calibrated[warm:]) <= 30 * MS * (1 + 1e-9)
    assert len(calibrated) > len(biased)  # smaller chunks: more steps for the same prompt


def test_disabled_calibration_leaves_the_model_alone(tmp_path):
    from mnemosyne.engine.policies import make_policies
    from mnemosyne.kv_cache.manager import KVCacheManager

    model_dir = write_config(tmp_path, "llama32_1b", LLAMA32_1B)
    spec = device_spec("h200")
    for on in (True, False):
        args = EngineArgs(model=str(model_dir), chunk_policy="adaptive", online_calibration=on)
        config = simulated_engine_config(model_dir, args, spec)
        policies = make_policies(config, KVCacheManager(config.cache), latency_model_for(config, spec))
        assert (policies.calibration is not None) is on
        assert isinstance(policies.chunk_policy.model, CalibratedLatencyModel) is on
    assert math.isclose(CalibrationConfig().min_factor * CalibrationConfig().max_factor, 1.0)


def test_tbt_slo_quantile_reaches_the_calibration(tmp_path):
    """--tbt-slo-quantile sets the quantile the correction applies; outside [0.5, 1] is refused."""
    from mnemosyne.engine.policies import make_policies
    from mnemosyne.errors import ConfigError
    from mnemosyne.kv_cache.manager import KVCacheManager

    model_dir = write_config(tmp_path, "llama32_1b", LLAMA32_1B)
    spec = device_spec("h200")
    args = EngineArgs(model=str(model_dir), chunk_policy="adaptive", tbt_slo_quantile=0.98)
    config = simulated_engine_config(model_dir, args, spec)
    policies = make_policies(config, KVCacheManager(config.cache), latency_model_for(config, spec))
    assert policies.calibration is not None and policies.calibration.config.quantile == 0.98
    assert EngineArgs().tbt_slo_quantile == CalibrationConfig().quantile  # one default
    with pytest.raises(ConfigError, match="tbt_slo_quantile"):
        EngineArgs(model=str(model_dir), tbt_slo_quantile=0.2).policy_config("cpu").validate()


def test_engine_feeds_calibration_and_tokens_are_unchanged(tiny_model_dir):
    """The real engine observes every processed step; on or off, the greedy tokens are the same."""
    from mnemosyne import LLM, SamplingParams

    model_dir = str(tiny_model_dir("llama"))
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [[3 + (7 * i + j) % 90 for j in range(n)] for i, n in enumerate((5, 37, 80))]
    tokens = {}
    for on in (True, False):
        with LLM(model=model_dir, dtype="float32", device="cpu", chunk_policy="adaptive", tbt_slo_ms=5.0,
                 chunk_granularity=4, min_chunk_tokens=4, block_size=4, online_calibration=on) as llm:  # fmt: skip
            tokens[on] = [o.token_ids for o in llm.generate(prompts, params)]
            if on:
                snapshot = llm.engine.policies.calibration.snapshot()
                assert snapshot["num_observed"] >= 3 and snapshot["host_s"] >= 0  # no timing asserted
            else:
                assert llm.engine.policies.calibration is None
    assert tokens[True] == tokens[False]


# ---- the best TTFT under a TBT target -------------------------------------------------------


class LinearChunkModel:
    """1 ms + 0.01 ms per query token + 1e-8 s per (chunk token, prefix key) pair; decodes 0.1 ms each."""

    layout = None

    def step_time_s(self, composition: StepComposition) -> float:
        g = composition.groups[0]
        return 1 * MS + 0.01 * MS * g.num_tokens + 1e-8 * g.chunk_prefix_pairs + 0.1 * MS * g.num_decodes


def test_ttft_bound_takes_the_largest_fitting_chunk_every_step():
    from mnemosyne.simulator.ttft_bound import best_ttft_under_tbt, slo_for_ttft_s

    model = LinearChunkModel()
    b = best_ttft_under_tbt(model, 20_000, 4, 1000, 10 * MS, decodes_grow=False)
    # by hand: the step with 4 decodes is 1.4 ms + c (0.01 ms + 1e-8 s * P) <= 10 ms, 4 decode tokens too
    prefix, t, steps = 0, 0.0, 0
    while prefix < 20_000:
        c = min(int((10 * MS - 1.4 * MS - 0.04 * MS) / (0.01 * MS + 1e-8 * prefix) + 1e-9), 20_000 - prefix)
        t += 1.44 * MS + c * (0.01 * MS + 1e-8 * prefix)
        prefix, steps = prefix + c, steps + 1
    assert b.num_steps == steps and b.ttft_s == pytest.approx(t)
    assert b.num_steps_over_target == 0 and b.first_over_target_prefix_tokens is None
    assert b.max_step_s <= 10 * MS * (1 + 1e-9) and b.unconstrained_s < b.ttft_s
    sizes = [c["chunk_tokens"] for c in b.checkpoints]
    assert sizes == sorted(sizes, reverse=True) and len(sizes) >= 4  # chunks shrink as the prefix grows
    # a target the decodes alone exceed: every step overshoots with the minimum chunk, and progresses
    over = best_ttft_under_tbt(model, 1000, 100, 1000, 5 * MS, overshoot_chunk_tokens=32)
    assert over.num_steps_over_target == over.num_steps == 32 and over.first_over_target_prefix_tokens == 0
    # the target needed for a TTFT: the bound there meets it, a slightly smaller target does not
    need_s = slo_for_ttft_s(
        model, 20_000, 4, 1000, 1.1 * b.unconstrained_s, lo_s=2 * MS, hi_s=1.0, tolerance_s=1e-5
    )
    assert best_ttft_under_tbt(model, 20_000, 4, 1000, need_s).ttft_s <= 1.1 * b.unconstrained_s
    assert best_ttft_under_tbt(model, 20_000, 4, 1000, need_s - 2e-5).ttft_s > 1.1 * b.unconstrained_s


def test_prompt_flops_floor_of_the_8b_shape():
    from mnemosyne.latency.roofline import H200
    from mnemosyne.latency.shape import ModelShape
    from mnemosyne.simulator.ttft_bound import prompt_flops_floor_s

    shape = ModelShape(32, 4096, 14336, 32, 8, 128, 128256, 2)
    assert prompt_flops_floor_s(shape, 262144, H200) == pytest.approx(
        35.45, rel=1e-3
    )  # the benchmarks' floor
