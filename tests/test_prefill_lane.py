"""The prefill lane (engine/prefill_lane.py): who enters it and when, its chunks, the hand-back
of a prompt's last token, preemption and aborts while its chunk runs (scheduler, on a real KV
manager); and the whole engine with the lane against HF transformers (on CPU the lane is a
thread sharing the cores; on a GPU a green context)."""

from __future__ import annotations

import pytest
from conftest import TEST_DEVICE
from test_adaptive_scheduling import MS, Clock, FakeLatencyModel
from test_exactness import ATOL, make_prompts
from test_scheduler import make_req

from mnemosyne import LLM, SamplingParams
from mnemosyne.config import CacheConfig, PrefillLaneConfig, SchedulerConfig
from mnemosyne.engine.lane_state import LaneHold
from mnemosyne.engine.prefill_time import PrefillTimeTable
from mnemosyne.engine.priority import LARSPriority
from mnemosyne.engine.scheduler import Scheduler
from mnemosyne.errors import ConfigError
from mnemosyne.kv_cache.manager import KVCacheManager
from mnemosyne.latency.beside_lane import SCALE_WEIGHT, BesideLaneLatencyModel
from mnemosyne.latency.composition import GroupLoad, StepComposition
from mnemosyne.latency.shape import Layout
from mnemosyne.request import RequestStatus
from mnemosyne.wire.plan import StepResult

LANE = PrefillLaneConfig(free_sms=16, min_prompt_tokens=40, chunk_tokens=16)


def lane_sched(
    budget: int, chunk: int, num_blocks: int, block_size: int = 4
) -> tuple[Scheduler, KVCacheManager]:
    kv = KVCacheManager(CacheConfig(block_size, (num_blocks,), None))
    return Scheduler(SchedulerConfig(256, budget, 16, chunk, prefill_lane=LANE), kv), kv


def req(rid: str, prompt_len: int, **sp):
    return make_req(rid, prompt_len, **sp)


def run_main(s, sampled=None):
    out = s.schedule()
    s.update_from_output(out, sampled or {c.request.request_id: 7 for c in out.chunks if c.sample})
    return out


def test_long_prompt_enters_the_lane_and_hands_back_its_last_token():
    s, kv = lane_sched(budget=8, chunk=8, num_blocks=64)
    long, short = req("long", 60), req("short", 5)
    s.add_request(long)
    s.add_request(short)
    first = run_main(s)  # admission: the steps run the first chunks
    assert [(c.request.request_id, c.num_tokens) for c in first.chunks] == [("long", 8)]
    a = s.schedule_lane()  # 52 left >= 40: the lane takes it
    b = s.schedule_lane()  # a second chunk queues behind the first
    assert a is not None and b is not None and s.schedule_lane() is None  # two in flight at most
    assert [(c.start, c.num_tokens) for c in (*a.chunks, *b.chunks)] == [(8, 16), (24, 16)]
    step = s.schedule()  # the steps skip the lane's owner meanwhile
    assert [c.request.request_id for c in step.chunks] == ["short"]
    s.update_from_output(step, {"short": 7})
    sizes = [16, 16]
    for out in (a, b):
        s.update_from_output(out, {})
        s.lane_done()
    while (out := s.schedule_lane()) is not None:
        sizes.append(out.chunks[0].num_tokens)
        assert not out.chunks[0].sample
        s.update_from_output(out, {})
        s.lane_done()
    assert sizes == [16, 16, 16, 3] and long.num_computed_tokens == 59  # all but the last token
    last = s.schedule()  # the steps take the owner back: its last token samples
    chunk = next(c for c in last.chunks if c.request is long)
    assert (chunk.start, chunk.num_tokens, chunk.sample) == (59, 1, True)
    assert s.num_lane_chunks == 4 and not s.lane_busy


def test_the_steps_stop_at_the_claim_even_with_a_chunk_in_flight():
    """Async scheduling plans a step before the last one is processed: the owner is claimed at
    the start of that step, so the steps give it no second chunk, and the lane starts once
    the steps' chunk is done."""
    s, _ = lane_sched(budget=8, chunk=8, num_blocks=64)
    long = req("long", 60)
    s.add_request(long)
    first = s.schedule()  # admission: [0, 8) in flight
    second = s.schedule()  # claimed at its start: nothing of long
    assert [c.num_tokens for c in first.chunks] == [8] and second.is_empty
    assert s.schedule_lane() is None  # [0, 8) still in flight in the steps
    s.update_from_output(first, {})
    out = s.schedule_lane()
    assert out is not None and (out.chunks[0].start, out.chunks[0].num_tokens) == (8, 16)


def test_a_second_long_prompt_waits_for_the_lane_and_then_owns_it():
    """While the lane has an owner, another prompt that would qualify gets nothing from the
    steps after its admission chunk; it owns the lane once the first has no lane chunk left to
    launch, while the first's last one still runs (the lane keeps two in flight)."""
    s, _ = lane_sched(budget=8, chunk=8, num_blocks=64)
    first, second, short = req("first", 60), req("second", 56), req("short", 5)
    s.add_request(first)
    run_main(s)  # first's admission chunk
    lane_outs = [s.schedule_lane(), s.schedule_lane()]
    s.add_request(second)
    s.add_request(short)
    ids = [c.request.request_id for c in run_main(s).chunks]
    assert "second" in ids  # its admission chunk (48 left afterwards: it qualifies)
    for _ in range(5):  # the steps give it nothing more while first owns the lane
        assert [c.request.request_id for c in run_main(s).chunks if c.request.is_prefill] == []
    assert second.num_computed_tokens == 8
    owners = []
    while lane_outs:
        out = lane_outs.pop(0)
        s.update_from_output(out, {})
        s.lane_done()
        if (nxt := s.schedule_lane()) is not None:
            owners.append(nxt.chunks[0].request.request_id)
            lane_outs.append(nxt)
        if owners[-1:] == ["second"]:
            break
    assert owners == ["first", "first", "second"] and first.num_computed_tokens == 56
    assert [(o.chunks[0].request.request_id, o.chunks[0].start) for o in lane_outs] == [
        ("first", 56),
        ("second", 8),
    ]
    assert [
        c.request for c in run_main(s).chunks if c.request.is_prefill
    ] == []  # first's [56, 59) still runs
    s.update_from_output(lane_outs[0], {})
    s.lane_done()
    last = run_main(s)  # first's last token samples in the steps; second stays in the lane
    assert [(c.request.request_id, c.start) for c in last.chunks if c.request is not short] == [("first", 59)]


def test_a_long_prompt_that_would_miss_its_deadline_overtakes_an_owner_that_can_spare_it():
    """LARS: a prompt queued behind the lane's owner takes the lane at the next chunk when
    waiting would make it miss its TTFT deadline and the owner can still meet its own behind
    it; it keeps the lane to its end (no swap back, no processor sharing), the owner resumes
    where it stopped, and no token is computed twice."""
    clock = Clock()
    s, _ = lane_sched(budget=8, chunk=8, num_blocks=96)
    s._clock = clock
    table = PrefillTimeTable(FakeLatencyModel(), 3 * MS, granularity_tokens=8, resolution_tokens=64)
    lars = LARSPriority(table, 1.5, 0.0)  # deadlines: 1.5 x 3.4 ms (200 tokens), 1.5 x 1.1 ms (64)
    s.priority = lars
    big, small = req("big", 200), req("small", 64)
    big.arrival_time = 0.0
    s.add_request(big)
    run_main(s)  # big's admission chunk
    owners, spans = [], []

    def lane_chunk() -> bool:
        if (out := s.schedule_lane()) is None:
            return False
        chunk = out.chunks[0]
        owners.append(chunk.request.request_id)
        spans.append((chunk.request.request_id, chunk.start, chunk.end))
        clock.now += 0.2 * MS
        s.update_from_output(out, {})
        s.lane_done()
        return True

    for _ in range(3):
        lane_chunk()
    small.arrival_time = clock.now
    s.add_request(small)
    run_main(s)  # small's admission chunk: it queues behind big
    assert lars.overtakes(small, big, clock.now) and not lars.overtakes(big, small, clock.now)
    while lane_chunk():
        pass
    assert owners == ["big"] * 3 + ["small"] * 4 + ["big"] * 9
    for r in (big, small):  # each prompt's lane chunks tile [8, num_tokens - 1) in order
        mine = [(a, b) for rid, a, b in spans if rid == r.request_id]
        assert mine[0][0] == 8 and mine[-1][1] == r.num_tokens - 1
        assert all(b0 == a1 for (_, b0), (a1, _) in zip(mine, mine[1:], strict=False))
    assert s.num_preemptions == 0


def test_a_new_owner_waits_for_its_steps_chunk_behind_an_aborted_owners_lane_chunk():
    """The lane's stream does not wait for the steps': a new owner gets no lane chunk while
    its own chunk is in the steps' flight, even when the lane's flight still holds a chunk of
    the aborted owner before it."""
    s, _ = lane_sched(budget=8, chunk=8, num_blocks=64)
    first, second = req("first", 60), req("second", 56)
    s.add_request(first)
    run_main(s)
    lane_out = s.schedule_lane()
    s.add_request(second)
    admission = s.schedule()  # second's first chunk, in the steps' flight
    assert [c.request.request_id for c in admission.chunks] == ["second"]
    s.finish_request("first", RequestStatus.FINISHED_ABORTED)  # its lane chunk is still in flight
    assert s.schedule_lane() is None  # second owns the lane now, but [0, 8) is not computed yet
    s.update_from_output(admission, {})
    out = s.schedule_lane()
    assert out is not None and out.chunks[0].request is second and out.chunks[0].start == 8
    s.update_from_output(lane_out, {})
    s.lane_done()


def test_short_prompts_and_prompt_logprobs_stay_out_of_the_lane():
    s, _ = lane_sched(budget=8, chunk=8, num_blocks=64)
    s.add_request(req("short", 39))
    s.add_request(req("plp", 60, prompt_logprobs=1))
    run_main(s)
    run_main(s)
    assert s.schedule_lane() is None


def test_abort_while_the_lane_runs_frees_the_kv_when_its_chunk_is_done():
    s, kv = lane_sched(budget=8, chunk=8, num_blocks=64)
    long = req("long", 60)
    s.add_request(long)
    run_main(s)
    outs = [s.schedule_lane(), s.schedule_lane()]
    s.finish_request("long", RequestStatus.FINISHED_ABORTED)
    assert kv.has_request("long")  # the lane may still write its blocks
    for out in outs:
        assert kv.has_request("long")  # until its last chunk in flight is done
        s.update_from_output(out, {})  # a stale chunk: dropped
        s.lane_done()
    assert not kv.has_request("long") and not s.lane_busy
    kv.check_integrity()


def test_the_lane_request_is_never_preempted_while_its_chunks_run():
    s, kv = lane_sched(budget=16, chunk=16, num_blocks=19, block_size=4)  # 76 tokens of KV
    other, long = req("other", 8, max_tokens=60), req("long", 60)
    s.add_request(other)
    s.add_request(long)
    run_main(s)  # other's prompt and long's first 8 tokens
    assert s.schedule_lane() is not None and s.schedule_lane() is not None  # long: 40 tokens, 10 blocks
    for _ in range(40):  # other decodes until the pool runs dry; long (in the lane) is never the victim
        out = s.schedule()
        s.update_from_output(out, {c.request.request_id: 7 for c in out.chunks if c.sample})
        assert long.status is RequestStatus.RUNNING and kv.has_request("long")
    assert other.num_preemptions >= 1
    kv.check_integrity()


class KeysModel:
    """A fake latency model (seconds): 2 ms + 1 us per decode key + 0.1 ms per chunk token."""

    layout = Layout()

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    def step_time_s(self, composition: StepComposition) -> float:
        g = composition.groups[0]
        chunk_tokens = g.num_tokens - g.num_decodes
        return self.scale * (2 * MS + 1e-3 * MS * g.decode_kv_tokens + 0.1 * MS * chunk_tokens)


def keys_compute_s(load: GroupLoad) -> float:
    """KeysModel's FLOPs at the peaks (seconds): 0.08 ms of each chunk token's 0.1 ms."""
    return 0.08 * MS * (load.num_tokens - load.num_decodes)


def decodes(num: int, keys: int) -> StepComposition:
    load = GroupLoad()
    for _ in range(num):
        load = load.plus_decode(keys)
    return StepComposition.single(load)


class FakeLaneExecutor:
    """The executor's lane surface: records each chunk's SMs; every chunk done at once."""

    lane_steps_sms_choices = (16, 24, 32)
    device_num_sms = 128

    def __init__(self) -> None:
        self.submitted: list[int | None] = []
        self.pending = 0

    def submit_lane(self, plan, steps_sms):
        self.submitted.append(steps_sms)
        self.pending += 1

    def lane_result(self, timeout_s):
        if not self.pending:
            return None
        self.pending -= 1
        return StepResult(0)


def three_decodes_and_a_long_prompt(beside: BesideLaneLatencyModel):
    """3 short requests decoding (10 keys each) and a 200-token prompt after its first chunk in
    the steps, with a LaneDriver over `beside` and a FakeLaneExecutor (128 SMs, 16-32 free)."""
    from mnemosyne.engine.lane_split import LaneSplitChooser
    from mnemosyne.engine.prefill_lane import LaneDriver
    from mnemosyne.engine.step_plan import PlanBuilder

    s, kv = lane_sched(budget=64, chunk=64, num_blocks=512)
    shorts = [req(f"s{i}", 8, max_tokens=100) for i in range(3)]
    for r in shorts:
        s.add_request(r)
    run_main(s)  # the short prompts prefill: they decode from now on
    long = req("long", 200)
    s.add_request(long)
    run_main(s)  # the long prompt's first chunk in the steps
    ex = FakeLaneExecutor()
    split = LaneSplitChooser(beside, 0.03)
    driver = LaneDriver(s, PlanBuilder(s, kv), ex, lambda sched, result: [], lambda sched: 0.0, None, split)
    return s, shorts, long, ex, driver


def test_lane_driver_gives_each_chunk_the_sms_the_decodes_need():
    """The driver sizes each chunk's split from the running decodes (the owner aside), keeps
    the steps' model at the running chunk's share, and learns from the confined steps."""
    from mnemosyne.wire.plan import StepPath, StepTrace

    # base 5x: (2 + 0.03 ms) x 5, all but the keys' 0.15 ms weights: 33.1 ms on 16 of 128 SMs, 22.1 on 24
    beside = BesideLaneLatencyModel(KeysModel(), KeysModel(scale=5.0), 10 * MS, keys_compute_s)
    s, _, _, ex, driver = three_decodes_and_a_long_prompt(beside)
    load = s.decode_load().groups[0]
    assert (load.num_decodes, load.decode_kv_tokens) == (3, 3 * 10)  # 8 prompt + 1 sampled + its own
    driver.advance(0.0)
    assert ex.submitted == [24]  # one at a time: the next once this one nears its end
    assert beside.steps_share == 24 / 128
    d = s.decode_load()
    measured_s = beside.confined_s(d, 24 / 128) * 1.2  # the device 20% slower than modelled
    driver.observe_step(d, StepTrace(StepPath.DECODE_GRAPH, steps_sms=24), measured_s)
    driver.observe_step(d, StepTrace(StepPath.DECODE_GRAPH), 1.0)  # every SM: not learned
    assert beside.scale == pytest.approx(1 + SCALE_WEIGHT * 0.2)
    driver.drain()
    assert beside.steps_share is None and not s.lane_busy


def test_the_lane_holds_while_the_decodes_need_every_sm():
    """When no split leaves the decodes enough SMs but the whole device would, the driver
    launches nothing and the owner prefills in the steps; the lane resumes once a split fits."""
    # alone (2 + 0.03 ms) x 10 = 20.3 ms, 20 of it weights: 33.1 ms on 32 of 128 SMs, over 27
    beside = BesideLaneLatencyModel(KeysModel(), KeysModel(scale=10.0), 20 * MS, keys_compute_s)
    s, shorts, long, ex, driver = three_decodes_and_a_long_prompt(beside)
    driver.advance(0.0)
    assert ex.submitted == [] and not s.lane_busy  # held
    step = run_main(s)  # the owner is the steps' again: mixed batching on every SM
    assert any(c.request is long for c in step.chunks)
    for r in shorts:
        s.finish_request(r.request_id, RequestStatus.FINISHED_ABORTED)
    driver.advance(0.0)  # no decode left: a split fits, the lane resumes after the steps' chunks
    assert ex.submitted == [16] and s.lane_busy
    assert [c.request.request_id for c in run_main(s).chunks] == []  # the steps skip the owner again


def test_a_held_lane_keeps_its_prompts_out_of_the_steps_until_its_chunks_are_done():
    """Held while the previous owner's last chunk runs, the steps are still on the few SMs it
    leaves them: the new owner prefills in the steps only once that chunk is done (then on
    every SM)."""
    s, _ = lane_sched(budget=8, chunk=8, num_blocks=64)
    first, second = req("first", 60), req("second", 56)
    s.add_request(first)
    run_main(s)  # first's admission chunk
    s.add_request(second)
    run_main(s)  # second's admission chunk
    in_flight = []
    while first.num_dispatched_tokens < first.num_tokens - 1:  # first's chunks, the last stays in flight
        if (out := s.schedule_lane()) is not None:
            in_flight.append(out)
            continue
        s.update_from_output(in_flight.pop(0), {})
        s.lane_done()
    assert s.claim_lane() and s.lane_busy  # second owns the lane; first's last chunk runs
    s.hold_lane(LaneHold.FOR_DECODES)
    for _ in range(3):
        assert "second" not in [c.request.request_id for c in run_main(s).chunks]
    for out in in_flight:
        s.update_from_output(out, {})
        s.lane_done()
    assert "second" in [c.request.request_id for c in run_main(s).chunks]  # every SM: the steps' again


def test_lane_config_errors():
    with pytest.raises(ConfigError, match="multiple of 8"):
        PrefillLaneConfig(free_sms=12).validate()
    with pytest.raises(ConfigError, match="max_free_sms"):
        PrefillLaneConfig(free_sms=16, max_free_sms=8).validate()
    assert PrefillLaneConfig(free_sms=16).steps_sms_choices == (16, 24, 32)
    assert PrefillLaneConfig(free_sms=16, max_free_sms=16).steps_sms_choices == (16,)
    from mnemosyne.engine.args import EngineArgs

    with pytest.raises(ConfigError, match="one device"):
        EngineArgs(prefill_lane_free_sms=16, tp=2).validate()


LENS = (90, 5, 57, 23)  # two prompts enter the lane (>= 40 tokens left after admission)


def test_engine_with_the_lane_matches_hf(tiny_model_dir, tmp_path):
    """Greedy tokens identical to HF and sampled-token logprobs within 1e-4, with two long
    prompts in the lane (one after the other; their last, shorter chunks padded to the lane's
    chunk size) beside the short ones' steps; the step log keeps the lane's chunks and the
    steps beside them apart."""
    from test_exactness import hf_reference

    from mnemosyne.engine.step_log import read_lane_log, read_step_log

    model_dir = tiny_model_dir("llama")
    refs = hf_reference("llama", model_dir, LENS, 12)
    log = tmp_path / "steps.jsonl"
    with LLM(model=str(model_dir), dtype="float32", device=TEST_DEVICE, block_size=4, max_num_seqs=8,
             chunk_size=8, max_num_batched_tokens=16, prefill_lane_free_sms=16, prefill_lane_min_tokens=40,
             prefill_lane_chunk_tokens=16, step_log=str(log)) as llm:  # fmt: skip
        prompts = make_prompts(llm.engine.config.model.vocab_size, lens=LENS)
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1)
        outs = llm.generate(prompts, params)
        assert llm.engine.scheduler.num_lane_chunks >= 5
        llm.engine.kv_manager.check_integrity()
    for prompt, out, (ref_new, ref_logp) in zip(prompts, outs, refs, strict=True):
        assert out.token_ids == ref_new
        for i, (tok, entry) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
            assert abs(entry[tok] - ref_logp[len(prompt) + i - 1][tok].item()) < ATOL
    chunks, beside = read_lane_log(log)
    _, steps = read_step_log(log)
    assert len(chunks) >= 5 and all(c["seqs"][0][0] <= 16 and c["measured_s"] > 0 for c in chunks)
    assert all(c["lane_timing"]["launch_s"] > 0 and "cudnn_chunks" in c for c in chunks)
    # a prompt's last lane chunk is short: it ran padded to the lane's 16 rows (the tokens above match)
    assert any(c["seqs"][0][0] < 16 for c in chunks)
    assert beside and not any(s.get("lane") or s.get("beside_lane") for s in steps)


def test_abort_in_the_lane_loses_no_other_request(tiny_model_dir):
    """A long prompt aborted while its lane chunks run: the engine drains them, frees its KV
    once they are done, and the other requests finish with HF's tokens."""
    from test_exactness import hf_reference

    model_dir = tiny_model_dir("llama")
    lens = (5, 23)
    refs = hf_reference("llama", model_dir, lens, 12)
    with LLM(model=str(model_dir), dtype="float32", device=TEST_DEVICE, block_size=4, max_num_seqs=8,
             chunk_size=8, max_num_batched_tokens=16, prefill_lane_free_sms=16, prefill_lane_min_tokens=40,
             prefill_lane_chunk_tokens=16) as llm:  # fmt: skip
        engine = llm.engine
        vocab = engine.config.model.vocab_size
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        short_ids = [engine.add_request(p, params) for p in make_prompts(vocab, lens=lens)]
        long_id = engine.add_request(make_prompts(vocab, seed=5, lens=(200,))[0], params)
        while not engine.scheduler.lane_busy:
            engine.step()
        engine.abort(long_id)
        done = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                done[out.request_id] = out
        assert not engine.scheduler.lane_busy and not engine.kv_manager.has_request(long_id)
        assert engine.check_idle_integrity()
    for rid, (ref_new, _) in zip(short_ids, refs, strict=True):
        assert done[rid].token_ids == ref_new


@pytest.mark.gpu
@pytest.mark.skipif(TEST_DEVICE != "cuda", reason="green contexts need a GPU (MNEMOSYNE_TEST_DEVICE=cuda)")
def test_steps_run_on_the_sms_a_lane_chunk_leaves_them():
    """While a chunk runs the steps launch on its split's first SMs, in order with the steps
    before; once it is done, back on the worker's stream."""
    import torch

    from mnemosyne.worker.prefill_lane import PrefillLane

    base = torch.cuda.current_stream()
    lane = PrefillLane(torch.device("cuda"), (16, 24), lambda: None)
    try:
        with pytest.raises(ValueError, match="no lane split"):
            lane.launch(lambda: None, None, lambda timing: 0, steps_sms=8)
        x = torch.zeros(1 << 20, device="cuda")
        x += 1  # a step on the worker's stream
        chunk = lane.launch(lambda: torch.cuda._sleep(200_000_000), None, lambda timing: timing, steps_sms=24)  # ~0.1 s
        with lane.steps_stream():
            assert lane.steps_sms == 24 and torch.cuda.current_stream() != base
            x *= 3  # after the step before it, on the 24 SMs
        timing = chunk.result()  # the chunk's timing, from the lane thread once it ran
        assert timing.device_s > 0.05 and 0 <= timing.paced_s <= timing.launch_s
        with lane.steps_stream():
            assert lane.steps_sms is None and torch.cuda.current_stream() == base
            assert torch.all(x == 3)  # (back on the worker's stream, after the confined step)
    finally:
        lane.shutdown()
