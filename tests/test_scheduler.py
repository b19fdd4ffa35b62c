"""Scheduler: token budget, chunking, priorities, preemption, stops. A toy "model" samples tokens."""

from __future__ import annotations

import itertools

import pytest

from mnemosyne.config import CacheConfig, SchedulerConfig
from mnemosyne.engine.chunking import FixedChunkPolicy
from mnemosyne.engine.scheduler import Scheduler
from mnemosyne.engine.scheduler_output import SchedulerOutput
from mnemosyne.errors import InvalidRequestError
from mnemosyne.kv_cache.manager import KVCacheManager
from mnemosyne.request import Request, RequestStatus
from mnemosyne.sampling_params import SamplingParams

EOS = 2


def make_sched(
    *,
    budget: int = 64,
    max_model_len: int = 256,
    max_num_seqs: int = 16,
    chunk_size: int | None = None,
    block_size: int = 4,
    blocks: tuple[int, ...] = (64,),
    t: int | None = None,
    **kw,
) -> Scheduler:
    cfg = SchedulerConfig(max_model_len, budget, max_num_seqs, chunk_size)
    return Scheduler(cfg, KVCacheManager(CacheConfig(block_size, blocks, t)), **kw)


_arrival = itertools.count()


def make_req(rid: str, prompt_len: int, max_tokens: int = 4, **sp) -> Request:
    prompt = [10 + (i % 50) for i in range(prompt_len)]
    return Request(
        rid,
        prompt,
        SamplingParams(max_tokens=max_tokens, **sp),
        eos_token_ids=(EOS,),
        arrival_time=next(_arrival),
    )


def toy_token(req: Request, end: int) -> int:
    """Deterministic next token given the request's tokens [0, end); never EOS."""
    return 100 + sum(req.token_ids_in(0, end)) % 97


def check_step(s: Scheduler, out: SchedulerOutput) -> None:
    assert out.num_batched_tokens <= s.config.max_num_batched_tokens
    ids = [c.request.request_id for c in out.chunks]
    assert len(ids) == len(set(ids))
    assert s.num_running <= s.config.max_num_seqs
    s.kv_manager.check_integrity()
    for c in out.chunks:
        r = c.request
        assert r.status is RequestStatus.RUNNING and c.num_tokens >= 1
        assert c.sample == (c.end == r.num_tokens)
        assert s.kv_manager.pieces(r.request_id)[-1].token_end >= c.end


def step(s: Scheduler, tokens: dict[str, int] | None = None) -> tuple[SchedulerOutput, list[Request]]:
    out = s.schedule()
    check_step(s, out)
    sampled = {c.request.request_id: toy_token(c.request, c.end) for c in out.chunks if c.sample}
    sampled.update(tokens or {})
    finished = s.update_from_output(out, sampled).finished
    s.kv_manager.check_integrity()
    return out, finished


def run_all(s: Scheduler, max_steps: int = 1000) -> list[SchedulerOutput]:
    outs = []
    while s.has_unfinished_requests():
        assert len(outs) < max_steps, "no progress"
        outs.append(step(s)[0])
    assert s.kv_manager.usage() == [0.0] * s.kv_manager.num_kvp_groups
    return outs


# ---- admission ------------------------------------------------------------------------------


def test_rejections_name_both_numbers():
    s = make_sched(max_model_len=100, blocks=(8,))  # 32 KV slots
    with pytest.raises(InvalidRequestError, match="empty"):
        s.add_request(make_req("e", 0))
    with pytest.raises(
        InvalidRequestError, match=r"prompt \(90 tokens\) \+ max_tokens \(20\) = 110.*max_model_len \(100 tokens\)"
    ):
        s.add_request(make_req("long", 90, 20))
    with pytest.raises(InvalidRequestError, match=r"= 40 exceeds the KV cache.*\(32 tokens\)"):
        s.add_request(make_req("kv", 30, 10))
    s.add_request(make_req("ok", 28, 4))
    with pytest.raises(InvalidRequestError, match="'ok' is already in use"):
        s.add_request(make_req("ok", 3))
    assert s.num_waiting == 1


# ---- budget, chunking, decode priority ----------------------------------------------------


def test_budget_and_chunk_sizes_follow_policy():
    s = make_sched(budget=10, chunk_size=4)
    s.add_request(make_req("a", 10, max_tokens=2))
    s.add_request(make_req("b", 6, max_tokens=2))
    out, _ = step(s)
    assert [(c.request.request_id, c.start, c.num_tokens) for c in out.chunks] == [("a", 0, 4), ("b", 0, 4)]
    out, _ = step(s)
    # running prefills in priority order: a [4, 8), b [4, 6) which samples
    assert [(c.request.request_id, c.start, c.num_tokens, c.sample) for c in out.chunks] == [
        ("a", 4, 4, False),
        ("b", 4, 2, True),
    ]
    out, _ = step(s)
    assert [(c.request.request_id, c.num_tokens) for c in out.chunks] == [("b", 1), ("a", 2)]  # decode first
    run_all(s)


class ThreePolicy(FixedChunkPolicy):
    def chunk_size(self, request: Request, num_pending: int, budget_left: int) -> int:
        return min(3, num_pending, budget_left)


def test_custom_chunk_policy():
    s = make_sched(budget=100, chunk_policy=ThreePolicy())
    s.add_request(make_req("a", 10, max_tokens=1))
    sizes = [c.num_tokens for out in run_all(s) for c in out.chunks]
    assert sizes == [3, 3, 3, 1]


def test_decodes_never_starved_by_long_prefill():
    s = make_sched(budget=16, chunk_size=16)
    s.add_request(make_req("short", 3, max_tokens=20))
    step(s)  # short's prefill
    s.add_request(make_req("long", 120, max_tokens=2))
    num_long_chunks = 0
    while s.get_request("long") is not None and s.get_request("long").is_prefill:
        out, _ = step(s)
        ids = [c.request.request_id for c in out.chunks]
        if s.get_request("short") is not None:
            assert ids[0] == "short" and out.chunks[0].num_tokens == 1
            assert out.num_batched_tokens == 16  # long takes the rest of the budget
        num_long_chunks += "long" in ids
    assert num_long_chunks == 8  # 120 tokens in chunks of <= 15
    run_all(s)


def test_max_num_seqs_respected():
    s = make_sched(max_num_seqs=2)
    for i in range(5):
        s.add_request(make_req(f"r{i}", 5, max_tokens=3))
    out, _ = step(s)
    assert [c.request.request_id for c in out.chunks] == ["r0", "r1"]
    assert (s.num_running, s.num_waiting) == (2, 3)
    outs = run_all(s)
    assert all(len(o.chunks) <= 2 for o in outs)


def test_fcfs_order_and_tie_break():
    s = make_sched(budget=5, chunk_size=5)
    s.add_request(Request("late", [1] * 5, SamplingParams(max_tokens=1), arrival_time=5.0))
    s.add_request(Request("tie2", [1] * 5, SamplingParams(max_tokens=1), arrival_time=1.0))
    s.add_request(Request("tie1", [1] * 5, SamplingParams(max_tokens=1), arrival_time=1.0))
    order = [c.request.request_id for out in run_all(s) for c in out.chunks]
    assert order == ["tie2", "tie1", "late"]


# ---- preemption -----------------------------------------------------------------------------


def _outputs(blocks: int) -> tuple[dict[str, list[int]], int]:
    s = make_sched(budget=32, chunk_size=8, block_size=4, blocks=(blocks,))
    reqs = [make_req(f"r{i}", 10 + 3 * i, max_tokens=12) for i in range(4)]
    for r in reqs:
        s.add_request(r)
    run_all(s)
    assert all(r.status is RequestStatus.FINISHED_LENGTH for r in reqs)
    return {r.request_id: r.output_token_ids for r in reqs}, s.num_preemptions


def test_preemption_recomputes_to_identical_outputs():
    reference, num_preempted = _outputs(blocks=100)
    assert num_preempted == 0
    tight, num_preempted = _outputs(blocks=12)  # 48 slots; each request needs up to 31
    assert num_preempted > 0
    assert tight == reference
    assert all(len(v) == 12 for v in tight.values())


def test_preempts_lowest_priority_and_reports_it():
    s = make_sched(budget=64, block_size=4, blocks=(4,))  # 16 slots
    a, b = make_req("a", 8, max_tokens=6), make_req("b", 8, max_tokens=6)
    s.add_request(a)
    s.add_request(b)
    step(s)  # both prefilled: 8 slots (2 blocks) each -> cache full
    out, _ = step(s)  # a's decode needs a block (token 8): b, lowest priority, is preempted
    assert out.preempted_ids == ["b"]
    assert [c.request.request_id for c in out.chunks] == ["a"]
    assert b.status is RequestStatus.WAITING and b.num_computed_tokens == b.num_dispatched_tokens == 0
    assert b.num_preemptions == 1 and b.num_output_tokens == 1 and not s.kv_manager.has_request("b")
    run_all(s)
    assert a.num_output_tokens == b.num_output_tokens == 6


def test_failing_lowest_priority_request_preempts_itself():
    s = make_sched(budget=8, chunk_size=4, block_size=4, blocks=(4,))
    a, b = make_req("a", 4, max_tokens=8), make_req("b", 12, max_tokens=1)
    s.add_request(a)
    s.add_request(b)
    step(s)  # a [0, 4), b [0, 4)
    step(s)  # a decodes, b [4, 8): 4 blocks used
    out, _ = step(s)  # b [8, 12) needs a 5th block; a is already scheduled
    assert [c.request.request_id for c in out.chunks] == ["a"] and out.preempted_ids == ["b"]
    assert s.num_waiting == 1
    run_all(s)
    assert a.num_output_tokens == 8 and b.num_output_tokens == 1
    assert a.num_preemptions == 0 and b.num_preemptions == s.num_preemptions >= 1


def test_waiting_requests_do_not_preempt_running():
    s = make_sched(budget=64, block_size=4, blocks=(4,))
    s.add_request(make_req("a", 12, max_tokens=4))
    step(s)
    s.add_request(make_req("b", 8, max_tokens=1))  # needs 2 blocks, 1 free
    out, _ = step(s)
    assert [c.request.request_id for c in out.chunks] == ["a"] and not out.preempted_ids
    assert s.num_waiting == 1
    run_all(s)


# ---- multi-group ----------------------------------------------------------------------------


def test_chunks_never_straddle_kvp_groups():
    s = make_sched(budget=20, chunk_size=7, block_size=2, blocks=(6, 6, 6), t=8)
    s.add_request(make_req("a", 19, max_tokens=4))
    s.add_request(make_req("b", 5, max_tokens=6))
    for out in run_all(s):
        for c in out.chunks:
            assert c.start // 8 == (c.end - 1) // 8


# ---- stops and aborts -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sp", "token", "status", "num_out"),
    [
        ({}, EOS, RequestStatus.FINISHED_STOPPED, 1),
        ({"ignore_eos": True}, EOS, RequestStatus.FINISHED_LENGTH, 5),
        ({"stop_token_ids": [77]}, 77, RequestStatus.FINISHED_STOPPED, 1),
        ({}, 50, RequestStatus.FINISHED_LENGTH, 5),
    ],
)
def test_stop_rules(sp: dict, token: int, status: RequestStatus, num_out: int):
    s = make_sched()
    r = make_req("a", 4, max_tokens=5, **sp)
    s.add_request(r)
    finished: list[Request] = []
    while not finished:
        _, finished = step(s, {"a": token})
    assert finished == [r] and r.status is status and r.num_output_tokens == num_out
    assert r.output_token_ids[-1] == token
    assert not s.has_unfinished_requests() and s.get_request("a") is None
    assert s.kv_manager.usage() == [0.0]


def test_finish_request_frees_blocks_and_drops_stale_chunks():
    s = make_sched()
    s.add_request(make_req("a", 9))
    s.add_request(make_req("w", 9))
    out = s.schedule()
    assert s.kv_manager.has_request("a")
    a = s.finish_request("a", RequestStatus.FINISHED_ABORTED)
    assert a is not None and a.status is RequestStatus.FINISHED_ABORTED
    assert not s.kv_manager.has_request("a")
    assert s.finish_request("a", RequestStatus.FINISHED_ABORTED) is None  # now unknown
    assert s.finish_request("nope", RequestStatus.FINISHED_STOPPED) is None
    finished = s.update_from_output(out, {"a": 5, "w": 5}).finished
    assert finished == [] and a.num_output_tokens == 0  # stale chunk ignored
    s.kv_manager.check_integrity()
    assert s.num_running == 1
    s.add_request(make_req("x", 3))
    assert s.finish_request("x", RequestStatus.FINISHED_ABORTED) is not None  # from waiting
    assert s.num_waiting == 0
    with pytest.raises(ValueError):
        s.finish_request("w", RequestStatus.RUNNING)
    run_all(s)


def test_waiting_prompt_is_admitted_only_when_its_whole_kv_fits():
    """A 40-token prompt needs 10 blocks; with 8 free it waits (FCFS: the short one behind it
    waits too) instead of starting a prefill that would be preempted mid-way."""
    s = make_sched(budget=8, chunk_size=8, blocks=(12,))
    s.add_request(make_req("holder", 12, max_tokens=4))
    check_step(s, s.schedule())  # holder takes 2 blocks for its first chunk, then 3 in total
    s.add_request(make_req("long", 40, max_tokens=1))
    s.add_request(make_req("short", 4, max_tokens=1))
    out = s.schedule()
    check_step(s, out)
    assert [c.request.request_id for c in out.chunks] == ["holder"]
    assert s.kv_manager.num_free_blocks_total < s.kv_manager.blocks_needed(40)
    assert s.num_waiting == 2


def test_preemption_picks_a_victim_on_the_group_that_is_short():
    """Two KVP groups, both full: a's decode needs a block on group 0, so c (lowest priority
    on group 0) is preempted, not d (lowest overall, but on group 1)."""
    s = make_sched(budget=64, block_size=4, blocks=(4, 4))
    reqs = [make_req(r, 8, max_tokens=6) for r in "abcd"]
    for r in reqs:
        s.add_request(r)
    step(s)  # a, c on group 0; b, d on group 1 (2 blocks each): both groups full
    assert [s.kv_manager.groups_of(r) for r in "abcd"] == [{0}, {1}, {0}, {1}]
    out, _ = step(s)
    assert out.preempted_ids == ["c", "d"]
    assert [c.request.request_id for c in out.chunks] == ["a", "b"]
    run_all(s)
    assert all(r.num_output_tokens == 6 for r in reqs)
