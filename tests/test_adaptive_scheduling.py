"""Adaptive chunking, LARS and space sharing against a fake latency model (seconds, tokens)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
from test_scheduler import make_req, make_sched, run_all, step

from mnemosyne.engine.adaptive_chunking import AdaptiveChunkPolicy
from mnemosyne.engine.prefill_time import PrefillTimeTable
from mnemosyne.engine.priority import LARSPriority
from mnemosyne.engine.scheduler import Scheduler
from mnemosyne.latency.composition import GroupLoad, StepComposition
from mnemosyne.latency.shape import Layout
from mnemosyne.request import RequestStatus

MS = 1e-3


@dataclass
class FakeLatencyModel:
    """1 ms + 0.01 ms per token + 1 us per 100 (query, prefix key) pairs + 0.1 us per decode key."""

    layout: Layout = Layout()
    fixed_s: float = 1 * MS
    per_token_s: float = 0.01 * MS
    per_pair_s: float = 1e-8
    per_decode_key_s: float = 1e-7

    def group_s(self, g: GroupLoad) -> float:
        if g.is_empty:
            return 0.0
        pairs = g.chunk_prefix_pairs + g.chunk_causal_pairs
        return (
            self.fixed_s
            + self.per_token_s * g.num_tokens
            + self.per_pair_s * pairs
            + self.per_decode_key_s * g.decode_kv_tokens
        )

    def step_time_s(self, composition: StepComposition) -> float:
        return max(self.group_s(g) for g in composition.groups)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def adaptive_sched(
    target_s: float = 3 * MS,
    lars: bool = False,
    threshold: int = 1 << 30,
    model: FakeLatencyModel | None = None,
    clock: Clock | None = None,
    **kw,
) -> tuple[Scheduler, AdaptiveChunkPolicy, LARSPriority | None]:
    model = model or FakeLatencyModel()
    s = make_sched(clock=clock or Clock(), **kw)
    table = PrefillTimeTable(model, target_s, s.kv_manager.num_kvp_groups, s.kv_manager.max_tokens_per_kvp_group,
                             granularity_tokens=8, resolution_tokens=64)  # fmt: skip
    priority = LARSPriority(table, 1.5, 0.5) if lars else None
    policy = AdaptiveChunkPolicy(model, s.kv_manager, target_s, granularity_tokens=8, min_chunk_tokens=8,
                                 lars=priority, long_prefill_threshold_tokens=threshold)  # fmt: skip
    s.chunk_policy = policy
    if priority is not None:
        s.priority = priority
    return s, policy, priority


def test_budget_respected_and_chunks_shrink_as_prefix_grows():
    # 3 ms target: 1 ms + c * 0.01 ms + (c * P + c(c+1)/2) * 1e-8 s -> c = 176 at P = 0 (184 is
    # 3.01 ms), smaller later
    s, policy, _ = adaptive_sched(budget=4096, max_model_len=4096, block_size=8, blocks=(512,))
    s.add_request(make_req("a", 2000, max_tokens=2))
    sizes = []
    while s.has_unfinished_requests():
        out, _ = step(s)
        assert policy.predicted_step_s() <= 3 * MS
        sizes += [c.num_tokens for c in out.chunks if c.num_tokens > 1]
    assert sizes[0] == 176 and all(n % 8 == 0 for n in sizes[:-1])
    assert all(b <= a for a, b in zip(sizes[:-2], sizes[1:-1], strict=True))
    assert sizes[-2] < sizes[0] // 2 and sum(sizes) == 2000


def test_prefill_alone_uses_the_prefill_only_target():
    """No request decodes: the step may take prefill_only_step_s; once one decodes, the TBT target."""
    s, policy, _ = adaptive_sched(budget=4096, max_model_len=4096, block_size=8, blocks=(512,))
    policy.prefill_only_step_s = 10 * MS
    s.add_request(make_req("a", 3000, max_tokens=40))
    out, _ = step(s)
    # 1 ms + c * 0.01 ms + c(c+1)/2 * 1e-8 s <= 10 ms -> c = 672 (680 is 10.12 ms)
    assert [c.num_tokens for c in out.chunks] == [672]
    assert 3 * MS < policy.predicted_step_s() <= 10 * MS
    while s.get_request("a").is_prefill:  # "a" prefills alone, every step within 10 ms
        step(s)
        assert policy.predicted_step_s() <= 10 * MS
    s.add_request(make_req("b", 500, max_tokens=1))
    out, _ = step(s)  # "a" decodes now: "b" gets what fits the 3 ms target
    assert [c.request.request_id for c in out.chunks] == ["a", "b"]
    assert out.chunks[1].num_tokens < 176 and policy.predicted_step_s() <= 3 * MS
    run_all(s)


def test_a_decode_ahead_holds_the_step_to_the_tbt_target():
    """Async scheduling: a short prompt's sampling chunk is in flight beside a long prompt's
    chunk; the next step holds the short's decode ahead, so it is sized for the TBT target,
    not the prefill-only one (the short's first token gap is that step's time)."""
    s, policy, _ = adaptive_sched(budget=4096, max_model_len=8192, block_size=8, blocks=(2048,))
    s.config = dataclasses.replace(s.config, async_scheduling=True)
    policy.prefill_only_step_s = 10 * MS
    s.add_request(make_req("short", 40, max_tokens=8))
    s.add_request(make_req("long", 6000, max_tokens=2))
    first = s.schedule()  # nobody decodes: the short's whole prompt (it samples) and a long chunk
    assert [(c.request.request_id, c.sample) for c in first.chunks] == [("short", True), ("long", False)]
    assert policy.step_target_s() == 10 * MS
    second = s.schedule()  # first in flight: the short decodes ahead here
    assert [(c.request.request_id, c.num_tokens) for c in second.chunks][0] == ("short", 1)
    assert policy.step_target_s() == 3 * MS and policy.predicted_step_s() <= 3 * MS
    s.update_from_output(first, {"short": 7})
    s.update_from_output(second, {"short": 8})


def test_remainder_chunk_and_decodes_packed_first():
    s, policy, _ = adaptive_sched(budget=4096, block_size=8, blocks=(64,))
    s.add_request(make_req("a", 13, max_tokens=3))
    out, _ = step(s)
    assert [c.num_tokens for c in out.chunks] == [13]  # not a multiple of 8: the whole remainder
    s.add_request(make_req("b", 100, max_tokens=1))
    out, _ = step(s)
    assert [(c.request.request_id, c.num_tokens) for c in out.chunks] == [("a", 1), ("b", 100)]
    run_all(s)


def test_min_progress_for_the_first_prefill_only():
    # decodes alone exceed the target: the first prefill still gets the minimum chunk, the next none
    model = FakeLatencyModel(per_decode_key_s=1 * MS)
    s, policy, _ = adaptive_sched(model=model, budget=4096, block_size=8, blocks=(64,), target_s=3 * MS)
    s.add_request(make_req("d", 4, max_tokens=50))
    step(s)
    s.add_request(make_req("p", 40, max_tokens=1))
    s.add_request(make_req("q", 40, max_tokens=1))
    out, _ = step(s)
    assert [(c.request.request_id, c.num_tokens) for c in out.chunks] == [("d", 1), ("p", 8)]
    assert policy.predicted_step_s() > 3 * MS


def test_decoding_steps_stay_within_the_graph_size():
    """max_decoding_step_tokens caps a step's tokens while any request decodes (decodes
    included); a step with no decode is not capped; a later prefill gets nothing once the
    room is under a granule."""
    s, policy, _ = adaptive_sched(budget=4096, max_model_len=4096, block_size=8, blocks=(1024,), target_s=50 * MS)
    policy.max_decoding_step_tokens = 100
    s.add_request(make_req("a", 300, max_tokens=1))
    out, _ = step(s)  # nobody decodes: the whole prompt fits the 50 ms target, no cap
    assert [c.num_tokens for c in out.chunks] == [300]
    s.add_request(make_req("d", 4, max_tokens=20))
    step(s)  # "d" decodes from here on
    s.add_request(make_req("p", 500, max_tokens=1))
    s.add_request(make_req("q", 500, max_tokens=1))
    out, _ = step(s)
    # 1 decode + 96 tokens of "p" (a multiple of 8 within the 99 left); "q" finds 3 tokens of room
    assert [(c.request.request_id, c.num_tokens) for c in out.chunks] == [("d", 1), ("p", 96)]
    while s.get_request("p") is not None:  # until its last chunk (max_tokens=1)
        out, _ = step(s)
        assert sum(c.num_tokens for c in out.chunks) <= 100
    run_all(s)


def test_decodes_filling_the_graph_leave_the_first_prefill_uncapped():
    """More decodes than the graph room: the first prefill is sized by time alone, the next gets none."""
    s, policy, _ = adaptive_sched(budget=4096, max_model_len=4096, block_size=8, blocks=(1024,), target_s=50 * MS)
    policy.max_decoding_step_tokens = 4
    for i in range(6):
        s.add_request(make_req(f"d{i}", 4, max_tokens=20))
    step(s)
    s.add_request(make_req("p", 64, max_tokens=1))
    s.add_request(make_req("q", 64, max_tokens=1))
    out, _ = step(s)
    assert [(c.request.request_id, c.num_tokens) for c in out.chunks if c.num_tokens > 1] == [("p", 64)]
    run_all(s)


def test_decoding_step_cap_from_the_engine_args():
    from mnemosyne.engine.args import EngineArgs
    from mnemosyne.worker.piecewise_graph import MAX_PIECEWISE_TOKENS

    args = EngineArgs(max_num_batched_tokens=8192)
    assert args.policy_config("cuda").max_decoding_step_tokens == MAX_PIECEWISE_TOKENS
    assert args.policy_config("simulated").max_decoding_step_tokens == MAX_PIECEWISE_TOKENS
    assert args.policy_config("cpu").max_decoding_step_tokens is None  # no graphs on CPU
    assert EngineArgs(enforce_eager=True).policy_config("cuda").max_decoding_step_tokens is None
    assert EngineArgs(graph_sized_steps=False).policy_config("cuda").max_decoding_step_tokens is None
    assert EngineArgs(max_num_batched_tokens=300).policy_config("cuda").max_decoding_step_tokens == 304


def test_chunks_never_cross_a_kvp_group_boundary():
    s, _, _ = adaptive_sched(budget=4096, block_size=4, blocks=(32, 32, 32), t=40, target_s=50 * MS)
    s.add_request(make_req("a", 100, max_tokens=2))
    for out in run_all(s):
        for c in out.chunks:
            assert c.start // 40 == (c.end - 1) // 40
    # the first chunk stops at the boundary, not at a multiple of the granularity below it


def test_kvp_busiest_group_sets_the_time():
    comp = StepComposition((GroupLoad().plus_chunk(100, 0), GroupLoad().plus_chunk(10, 0)))
    model = FakeLatencyModel()
    assert model.step_time_s(comp) == pytest.approx(model.group_s(comp.groups[0]))


def test_lars_priority_changes_with_time_and_short_overtakes_long():
    clock = Clock()
    s, policy, lars = adaptive_sched(lars=True, clock=clock, budget=4096, max_model_len=8192, block_size=8,
                                     blocks=(1024,), target_s=3 * MS)  # fmt: skip
    assert lars is not None
    lars.min_deadline_s = 0.01
    long, short = make_req("long", 6000, max_tokens=2), make_req("short", 20, max_tokens=2)
    long.arrival_time = 0.0
    s.add_request(long)
    for _ in range(5):  # the long prefill runs on schedule: the clock advances by each predicted step
        step(s)
        clock.now += policy.predicted_step_s()
    short.arrival_time = clock.now
    s.add_request(short)
    # a fresh short request has more relative slack than the long one ...
    assert lars.key(short, clock.now) > lars.key(long, clock.now)
    out, _ = step(s)
    assert out.chunks[0].request is long and short.status is RequestStatus.WAITING
    # ... but its slack runs out faster: a few ms later it ranks first and overtakes the long prefill
    clock.now = short.arrival_time + 0.007
    assert lars.key(short, clock.now) < lars.key(long, clock.now)
    out, _ = step(s)
    assert [c.request for c in out.chunks[:2]] == [short, long]


def test_preemption_takes_the_most_slack_partial_prefill_before_decodes():
    clock = Clock()
    s = make_sched(budget=4096, chunk_size=8, block_size=4, blocks=(12,), clock=clock)
    table = PrefillTimeTable(FakeLatencyModel(), 3 * MS, granularity_tokens=8, resolution_tokens=64)
    s.priority = LARSPriority(table, 1.5, 0.5)
    d, urgent, relaxed = make_req("d", 8, max_tokens=30), make_req("u", 24, 1), make_req("r", 24, 1)
    d.arrival_time, urgent.arrival_time, relaxed.arrival_time = 0.0, 0.0, 0.3  # r has more slack
    for r in (d, urgent, relaxed):
        s.add_request(r)
    preempted: list[str] = []
    while s.has_unfinished_requests():
        out, _ = step(s)
        if out.preempted_ids:
            assert d.status is RequestStatus.RUNNING  # decodes go only after partial prefills
        preempted += out.preempted_ids
    assert preempted[0] == "r" and "d" not in preempted


def test_one_long_prefill_per_kvp_group_and_its_share():
    clock = Clock()
    s, policy, lars = adaptive_sched(lars=True, clock=clock, threshold=16, budget=4096, block_size=4,
                                     blocks=(512,), target_s=4 * MS, max_model_len=4096)  # fmt: skip
    assert lars is not None
    a, b = make_req("a", 800, max_tokens=1), make_req("b", 800, max_tokens=1)
    for r in (a, b):
        r.arrival_time = 0.0
        s.add_request(r)
    num_shared_steps = 0
    while s.has_unfinished_requests():
        long_before = [r for r in (a, b) if r.status is RequestStatus.RUNNING and policy.is_long(r)]
        slack = {r.request_id: lars.slack_fraction(r, clock.now) for r in long_before}
        out, _ = step(s)
        long_chunks = [c for c in out.chunks if c.request in long_before]
        assert len(long_chunks) <= 1  # one group: at most one long prefill per step
        if len(out.chunks) == 1 and long_chunks and slack[long_chunks[0].request.request_id] >= 0.5:
            # with slack to spare, a long prefill alone uses at most half of the target
            assert policy.predicted_step_s() <= 0.5 * 4 * MS + 1e-12
            num_shared_steps += 1
    assert num_shared_steps > 0


def test_two_long_prefills_on_different_groups_run_together():
    # 1.6 ms target: about 56 tokens per group per step; each request sits on its own group
    s, policy, _ = adaptive_sched(lars=True, threshold=8, budget=4096, block_size=4, blocks=(64, 64),
                                  target_s=1.6 * MS)  # fmt: skip
    a, b = make_req("a", 200, max_tokens=1), make_req("b", 200, max_tokens=1)
    for r in (a, b):
        r.arrival_time = 0.0
        s.add_request(r)
    out, _ = step(s)
    assert {c.request.request_id for c in out.chunks} == {"a", "b"}
    assert s.kv_manager.groups_of("a") != s.kv_manager.groups_of("b")
    out, _ = step(s)
    assert policy.is_long(a) and policy.is_long(b)
    assert {c.request.request_id for c in out.chunks} == {"a", "b"}


def test_out_of_slack_long_prefill_gets_the_whole_target():
    clock = Clock()
    s, policy, lars = adaptive_sched(lars=True, clock=clock, threshold=16, budget=4096, block_size=4,
                                     blocks=(256,), target_s=4 * MS, max_model_len=4096)  # fmt: skip
    a = make_req("a", 800, max_tokens=1)
    a.arrival_time = 0.0
    s.add_request(a)
    step(s)
    step(s)
    clock.now = 100.0  # long past its deadline
    assert lars is not None and lars.slack_fraction(a, clock.now) < 0
    step(s)
    assert policy.predicted_step_s() > 1 * MS + 0.5 * 3 * MS


def test_prefill_time_table_is_monotone_and_linear_between_points():
    table = PrefillTimeTable(FakeLatencyModel(), 3 * MS, granularity_tokens=8, resolution_tokens=64)
    ts = [table.time_s(n) for n in range(0, 1000, 16)]
    assert ts[0] == 0 and all(b > a for a, b in zip(ts, ts[1:], strict=False))
    assert table.time_s(96) == pytest.approx((table.time_s(64) + table.time_s(128)) / 2)
    assert table.remaining_s(500, 100) == pytest.approx(table.time_s(500) - table.time_s(100))
