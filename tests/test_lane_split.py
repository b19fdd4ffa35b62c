"""The prefill lane's split and timing (engine/lane_split.py, engine/prefill_lane.py): which SMs
the next lane chunk leaves the steps, or whether the lane holds for the steps' prompts; which
prompts the steps prefill beside the lane; and when the driver launches the next chunk."""

from __future__ import annotations

import pytest
from test_adaptive_scheduling import MS, Clock
from test_prefill_lane import FakeLaneExecutor, KeysModel, decodes, lane_sched, req, run_main
from test_scheduler import make_req

from mnemosyne.config import CacheConfig, SchedulerConfig
from mnemosyne.engine.lane_split import LaneSplitChooser, StepChunks
from mnemosyne.engine.lane_state import LaneHold
from mnemosyne.engine.prefill_lane import (
    LANE_CHUNK_RUN_SCALE,
    LANE_LAUNCH_LEAD_FRACTION,
    LANE_LAUNCH_LEAD_STEPS,
    LaneDriver,
)
from mnemosyne.engine.prefill_time import PrefillTimeTable
from mnemosyne.engine.priority import LARSPriority
from mnemosyne.engine.scheduler import Scheduler
from mnemosyne.engine.step_plan import PlanBuilder
from mnemosyne.kv_cache.manager import KVCacheManager
from mnemosyne.latency.beside_lane import SCALE_WEIGHT, BesideLaneLatencyModel
from mnemosyne.wire.plan import LaneChunkTiming, StepPath, StepResult, StepTrace

# The chooser's numbers (ms). KeysModel: 2 ms + 1 us a decode key + 0.1 ms a chunk token; the
# chunks' FLOPs are that whole 0.1 ms, no weights' share, every rate 1: on S of N = 128 SMs a
# step of c chunk tokens beside decodes of K keys takes 2 + K/1000 x N/S + 0.1 c x N/S, over
# LANE_STEP_HEADROOM 0.9 for the rates. Target 30 ms, chunks of 10..50 tokens. Decodes of no
# key (D0) fit 32 SMs (2 ms <= 0.95 x 30), and every split takes 50-token chunks:
#   32 SMs: (2 + 0.1 x 50 x 4) / 0.9 = 24.4 ms per 50 tokens: 0.4889 ms a token
#   64 SMs: (2 + 0.1 x 50 x 2) / 0.9 = 13.3 ms per 50 tokens: 0.2667 ms a token
#   96 SMs: (2 + 0.1 x 50 x 4/3) / 0.9 = 9.63 ms per 50 tokens: 0.1926 ms a token
#   every SM: 2 + 0.1 x 50 = 7 ms per 50 tokens (no headroom): 0.14 ms a token
# LARS: a deadline of 100 ms for every prompt (factor 0, minimum 0.1 s); its prefill table
# (KeysModel alone, 12.5-ms target) steps 100-token chunks of 12 ms: 0.12 ms a token.
N = 128
CHOICES = (32, 64)
TARGET_S = 30 * MS
NOW = 10.0
DEADLINE_S = 0.1
D0 = decodes(2, 0)


def chunk_flops_s(g) -> float:
    return 0.1 * MS * (g.num_tokens - g.num_decodes)


def chooser(with_lars: bool = True) -> LaneSplitChooser:
    """The header's chooser: target 30 ms, chunks of 10..50 tokens, LARS unless told not to."""
    beside = BesideLaneLatencyModel(
        KeysModel(), KeysModel(), 0.0, chunk_flops_s, keys_rate=1.0, chunks_rate=1.0
    )
    table = PrefillTimeTable(KeysModel(), 12.5 * MS, granularity_tokens=100, resolution_tokens=100)
    lars = LARSPriority(table, 0.0, DEADLINE_S) if with_lars else None
    return LaneSplitChooser(beside, TARGET_S, lars, StepChunks(10, 10, 50))


def prompt(rid: str, num_tokens: int, due_in_ms: float):
    """A prompt of `num_tokens` none dispatched, due `due_in_ms` after NOW."""
    r = make_req(rid, num_tokens)
    r.arrival_time = NOW + due_in_ms * MS - DEADLINE_S
    return r


def owner(due_in_ms: float):
    """The lane's owner: 1000 tokens, 500 done, so 500 x 0.12 = 60 ms left (LARS)."""
    r = prompt("owner", 1000, due_in_ms)
    r.num_computed_tokens = r.num_dispatched_tokens = 500
    return r


def choose(c: LaneSplitChooser, prompts, own, drain_ms: float = 5.0, dec=D0, choices=CHOICES):
    return c.choose(dec, prompts, own, N, choices, NOW, drain_ms * MS)


def test_the_rates_are_the_hand_computed_ones():
    """The arithmetic the other tests rely on (the header's table)."""
    c = chooser()
    for share, ms_a_token in (
        (32 / N, 22 / 45),
        (64 / N, 12 / 45),
        (96 / N, (2 + 20 / 3) / 45),
        (None, 0.14),
    ):
        assert 1 / c._rate(D0, 0, share) == pytest.approx(ms_a_token * MS)
    assert c.lars.remaining_prefill_s(owner(100)) == pytest.approx(60 * MS)


def test_without_lars_or_prompts_the_split_is_the_decodes_fewest():
    """No deadlines, or no prompt in the steps: the decodes alone decide (`fewest_sms`),
    including a hold when they need every SM, which is never counted as a hold for prompts."""
    # 7000 keys: 2 + 28 = 30 ms on 32 SMs (over 28.5), 16 on 64; 20000: 82 on 64, 22 on every SM
    for dec, fewest in ((D0, 32), (decodes(1, 7000), 64), (decodes(1, 20000), None)):
        assert chooser().beside.fewest_sms(dec, N, CHOICES, TARGET_S) == fewest
        late = prompt("q", 100, 1.0)  # late on every split
        expected = LaneHold.FOR_DECODES if fewest is None else fewest
        assert choose(chooser(with_lars=False), [late], owner(1000), dec=dec) == expected
        assert choose(chooser(), [], owner(1000), dec=dec) == expected
    c = chooser()  # the decodes need every SM: a hold whatever the prompts, not one for them
    assert choose(c, [late], owner(1000), dec=decodes(1, 20000)) is LaneHold.FOR_DECODES
    assert c.num_holds_for_prompts == 0


def test_a_prompt_on_time_on_the_fewest_split_gets_it():
    """100 tokens due in 60 ms: 48.9 ms on 32 SMs, on time: the fewest split; and never fewer
    SMs than the decodes need (7000 keys: 64) even when the prompt would fit on fewer."""
    assert choose(chooser(), [prompt("q", 100, 60)], owner(1000)) == 32
    assert choose(chooser(), [prompt("q", 100, 1000)], owner(1000), dec=decodes(1, 7000)) == 64


def test_a_prompt_on_time_only_on_a_wider_split_gets_the_fewest_such():
    """100 tokens due in 40 ms: 48.9 ms on 32 SMs (late), 26.7 on 64 and 19.3 on 96 (on time):
    64, the fewest on which it is on time; due in 22 ms, only 96 will do."""
    assert choose(chooser(), [prompt("q", 100, 40)], owner(1000), choices=(32, 64, 96)) == 64
    assert choose(chooser(), [prompt("q", 100, 22)], owner(1000), choices=(32, 64, 96)) == 96


def test_a_late_prompt_holds_the_lane_when_held_is_sooner_and_the_owner_spares_it():
    """100 tokens due in 10 ms, late on every split (26.7 ms on the widest, 64). Held, it ends
    after the drain + 14 ms on every SM: 5 + 14 = 19 < 26.7, and the owner (due in 90) ends at
    5 + 60 = 65 ms, + the 14 ms idle = 79 <= 90: hold. A 15-ms drain: 29 > 26.7, no sooner
    held: the decodes' split."""
    c = chooser()
    assert choose(c, [prompt("q", 100, 10)], owner(90), drain_ms=5) is LaneHold.FOR_PROMPTS
    assert c.num_holds_for_prompts == 1
    assert choose(c, [prompt("q", 100, 10)], owner(90), drain_ms=15) == 32
    assert c.num_holds_for_prompts == 1


def test_an_owner_that_would_miss_its_deadline_only_because_of_the_hold_keeps_the_lane():
    """The owner due in 70 ms ends at 5 + 60 = 65 without a hold (on time), 65 + 14 = 79 with
    it (late): it cannot spare the lane, so the decodes' split."""
    c = chooser()
    assert choose(c, [prompt("q", 100, 10)], owner(70)) == 32
    assert c.num_holds_for_prompts == 0


def test_an_owner_late_either_way_yields_only_to_a_prompt_with_less_relative_slack():
    """The owner ends at 65 ms either way. The prompt (due in 10, 12 ms of prefill left by
    LARS) has slack -2 ms (-0.02); the owner due in 62 has +2 ms (0.02): the prompt is the
    more urgent, hold. Due in 50, the owner's -10 ms (-0.1) is the more urgent: no hold."""
    c = chooser()
    q = prompt("q", 100, 10)
    assert c.lars.slack_fraction(q, NOW) == pytest.approx(-0.02)
    assert c.lars.slack_fraction(owner(62), NOW) == pytest.approx(0.02)
    assert choose(c, [q], owner(62)) is LaneHold.FOR_PROMPTS
    assert c.lars.slack_fraction(owner(50), NOW) == pytest.approx(-0.1)
    assert choose(c, [q], owner(50)) == 32
    assert c.num_holds_for_prompts == 1


def test_a_prompt_is_late_behind_the_tokens_of_the_prompts_ahead_of_it():
    """q1 (100 tokens, due in 80 ms) and q2 (50, due in 45) are each on time alone on 32 SMs
    (48.9, 24.4 ms). q2 behind q1 ends after 150 tokens: 73.3 ms on 32 (late), 40 on 64: 64.
    q2 ahead of q1: 24.4 and 73.3 <= 80 on 32, both on time: 32."""
    q1, q2 = prompt("q1", 100, 80), prompt("q2", 50, 45)
    assert choose(chooser(), [q1], owner(1000)) == 32
    assert choose(chooser(), [q2], owner(1000)) == 32
    assert choose(chooser(), [q1, q2], owner(1000)) == 64
    assert choose(chooser(), [q2, q1], owner(1000)) == 32


def test_steps_prompts_are_the_short_prefills_most_urgent_first():
    """The steps' prompts: a running short prefill with tokens to dispatch and a waiting short
    request, by priority (FCFS: the waiting one arrived first); not a decode, not the lane's
    owner, not a waiting prompt long enough for the lane. Without a lane: none."""
    s, _ = lane_sched(budget=16, chunk=8, num_blocks=128)
    dec, long = req("dec", 5, max_tokens=50), req("long", 200)
    s.add_request(dec)
    s.add_request(long)
    run_main(s)  # dec's prompt, long's first 8 tokens
    part = req("part", 30)
    s.add_request(part)
    run_main(s)  # dec decodes; part's first 8 tokens (22 left < 40: not the lane's)
    assert s.claim_lane() and s.lane_owner is long
    wait, long2 = req("wait", 10), req("long2", 60)
    wait.arrival_time = -1.0
    s.add_request(wait)
    s.add_request(long2)
    assert not dec.is_prefill and part.num_dispatched_tokens == 8
    assert s.steps_prompts() == [wait, part]
    plain = Scheduler(SchedulerConfig(256, 16, 16, 8), KVCacheManager(CacheConfig(4, (64,), None)))
    plain.add_request(req("w", 10))
    assert plain.steps_prompts() == []


def test_a_waiting_prompt_that_cannot_be_admitted_is_not_a_steps_prompt():
    """A waiting prompt whose whole prompt the free blocks cannot hold (the owner holds them)
    is not counted: holding the lane for it would stall the owner that must free them."""
    s, kv = lane_sched(budget=8, chunk=8, num_blocks=16)  # 64 tokens of KV, 4 a block
    s.add_request(req("long", 60))
    run_main(s)  # its first 8 tokens
    for _ in range(2):  # two 16-token lane chunks in flight: 40 tokens, 10 blocks
        assert s.schedule_lane() is not None
    s.add_request(req("small", 12))  # 3 blocks: admissible
    s.add_request(big := req("big", 30))  # 8 blocks: more than the 6 the owner leaves free
    assert kv.num_free_blocks_total == 6
    assert [r.request_id for r in s.steps_prompts()] == ["small"] and big not in s.steps_prompts()


class GatedLaneExecutor(FakeLaneExecutor):
    """FakeLaneExecutor whose chunks are done only when a result is queued in `results`."""

    def __init__(self) -> None:
        super().__init__()
        self.results: list[StepResult] = []

    def lane_result(self, timeout_s):
        return self.results.pop(0) if self.results else None


PREDICTED_S = 0.1  # every chunk alone on every SM
LANE_TARGET_S = 0.03


def lazy_driver() -> tuple[Clock, GatedLaneExecutor, LaneDriver]:
    """A 200-token prompt after its first 64 tokens in the steps, no decode (so 16 of the
    FakeLaneExecutor's 128 SMs each chunk), a clock at 1 s, chunks predicted 0.1 s alone."""
    clock = Clock()
    clock.now = 1.0
    s, kv = lane_sched(budget=64, chunk=64, num_blocks=512)
    s._clock = clock
    s.add_request(req("long", 200))
    run_main(s)
    ex = GatedLaneExecutor()

    def process(sched, result):
        s.update_from_output(sched, {})
        return []

    beside = BesideLaneLatencyModel(KeysModel(), KeysModel(), 0.0, lambda g: 0.0)
    split = LaneSplitChooser(beside, LANE_TARGET_S)
    driver = LaneDriver(s, PlanBuilder(s, kv), ex, process, lambda sched: PREDICTED_S, None, split, clock)
    return clock, ex, driver


def lane_run_s(scale: float) -> float:
    """A chunk's predicted run on 112 SMs: 0.1 s x scale x 128 / 112."""
    return PREDICTED_S * scale * 128 / 112


def test_the_driver_launches_the_next_chunk_within_the_lead_of_the_lane_idling():
    """One chunk per advance, the next only once the chunks in flight are predicted to end
    within the lead (2 targets + 5% of the newest's run), two in flight at most; the drain
    counts from the later of the oldest's launch and the last chunk done."""
    clock, ex, driver = lazy_driver()
    run_s = lane_run_s(LANE_CHUNK_RUN_SCALE)  # 0.1 x 1.13 x 128/112 = 0.1291 s
    lead_s = LANE_LAUNCH_LEAD_STEPS * LANE_TARGET_S + LANE_LAUNCH_LEAD_FRACTION * run_s  # 0.0665 s
    driver.advance(0.0)
    assert ex.submitted == [16] and driver.drain_s() == pytest.approx(run_s)
    clock.now = 1.0 + run_s - lead_s - 1e-6  # just before the lead: nothing
    driver.advance(0.0)
    assert ex.submitted == [16] and driver.drain_s() == pytest.approx(lead_s + 1e-6)
    clock.now += 2e-6  # just within it: the second chunk
    driver.advance(0.0)
    assert ex.submitted == [16, 16]
    assert driver.drain_s() == pytest.approx(1.0 + 2 * run_s - clock.now)  # both, from the first's launch
    clock.now = 1.0 + 2 * run_s - lead_s + 1e-6  # within the lead, but two in flight: the cap
    driver.advance(0.0)
    assert ex.submitted == [16, 16]
    timing = LaneChunkTiming(launch_s=0.01, paced_s=0.0, device_s=run_s)  # as predicted: r unchanged
    ex.results.append(StepResult(0, trace=StepTrace(StepPath.DECODE_GRAPH, lane=timing)))
    driver.advance(0.0)  # the first done: the second's run counts from now, a whole run left
    assert ex.submitted == [16, 16] and driver.run_scale == pytest.approx(LANE_CHUNK_RUN_SCALE)
    assert driver.drain_s() == pytest.approx(run_s)
    clock.now += run_s - lead_s + 1e-6
    driver.advance(0.0)
    assert ex.submitted == [16, 16, 16]


def test_the_driver_learns_a_chunks_run_from_its_device_time_else_its_clock_time():
    """r moves by SCALE_WEIGHT x (ratio - r), ratio = the run over 0.1 s x 128/112 = 0.1143 s:
    the worker's device time where the trace has it, else the clock's time since the chunk
    could start; the next chunk's predicted run uses the new r."""
    clock, ex, driver = lazy_driver()
    driver.advance(0.0)  # the first chunk at 1.0 s
    timing = LaneChunkTiming(launch_s=0.01, paced_s=0.0, device_s=0.2)  # ratio 0.2 / 0.1143 = 1.75
    ex.results.append(StepResult(0, trace=StepTrace(StepPath.DECODE_GRAPH, lane=timing)))
    clock.now = 1.5  # (the clock's 0.5 s is not used)
    driver.advance(0.0)  # done; the lane idle: the second chunk at 1.5 s
    scale = LANE_CHUNK_RUN_SCALE + SCALE_WEIGHT * (1.75 - LANE_CHUNK_RUN_SCALE)  # 1.192
    assert driver.run_scale == pytest.approx(scale)
    assert ex.submitted == [16, 16] and driver.drain_s() == pytest.approx(lane_run_s(scale))
    ex.results.append(StepResult(0, trace=StepTrace(StepPath.DECODE_GRAPH)))  # no lane timing
    clock.now = 1.66  # 0.16 s since it was launched: ratio 0.16 / 0.1143 = 1.4
    driver.advance(0.0)
    assert driver.run_scale == pytest.approx(scale + SCALE_WEIGHT * (1.4 - scale))  # 1.2128


def test_a_hold_for_prompts_keeps_the_owner_out_of_the_steps():
    """Held for the steps' prompts, the lane launches nothing and its owner still waits, so the
    prompts have the steps; held for the decodes, with no chunk in flight, the owner prefills
    in the steps (mixed batching on every SM)."""
    s, _ = lane_sched(budget=8, chunk=8, num_blocks=64)
    long = req("long", 60)
    s.add_request(long)
    run_main(s)  # its admission chunk in the steps
    assert s.claim_lane() and s.lane_owner is long
    s.hold_lane(LaneHold.FOR_PROMPTS)
    s.add_request(req("short", 20))  # under LANE's 40 tokens: never the lane's
    for _ in range(2):
        assert [c.request.request_id for c in run_main(s).chunks] == ["short"]
        assert s.schedule_lane() is None
    s.hold_lane(LaneHold.FOR_DECODES)
    assert "long" in [c.request.request_id for c in run_main(s).chunks]
    s.hold_lane(LaneHold.NONE)
    assert s.schedule_lane() is not None  # the lane resumes once the owner's steps chunk is done
