"""Async scheduling (step n+1 scheduled and launched before step n is processed) changes
nothing a request sees: tokens and logprobs are identical with it on and off (and to HF),
whatever finishes a request mid-batch, with aborts, seeds, penalties, min_tokens,
preemption and prefix caching. Each engine run also checks the scheduler's counters
after every step and that decode aheads really ran."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import torch
from conftest import TEST_DEVICE
from test_exactness import ATOL, check_against_hf, make_prompts

from mnemosyne import LLM, SamplingParams
from mnemosyne.config import CacheConfig, ModelConfig, SchedulerConfig
from mnemosyne.engine.args import EngineArgs
from mnemosyne.engine.scheduler import Scheduler
from mnemosyne.kv_cache.manager import KVCacheManager
from mnemosyne.request import Request

NAME = "llama"
LENS = (37, 5, 23, 11)


def run_engine(
    model_dir, async_scheduling: bool, params: list[SamplingParams], abort_at: dict[int, int] | None = None,
    prompts: list[list[int]] | None = None, eos_override: int | None = None, **kwargs,
):  # fmt: skip
    """Outputs per request (finished ones; aborted ones as last seen) and the number of decode
    aheads run per request. `abort_at`: request index -> step after which it is aborted."""
    kwargs = {"chunk_size": 8, "max_num_batched_tokens": 24, "block_size": 4, **kwargs}
    llm = LLM(model=str(model_dir), dtype="float32", device=TEST_DEVICE, async_scheduling=async_scheduling, **kwargs)
    engine = llm.engine
    if eos_override is not None:  # a token the model does sample becomes its eos
        model = replace(engine.config.model, eos_token_ids=(eos_override,))
        engine.config = replace(engine.config, model=model)
    assert engine.config.scheduler.async_scheduling is async_scheduling
    prompts = prompts or make_prompts(engine.config.model.vocab_size, lens=LENS)
    num_ahead: Counter[str] = Counter()  # request id -> decode aheads run
    build = engine.planner.build

    def counting_build(sched):
        plan = build(sched)
        num_ahead.update(c.request_id for c in plan.chunks if c.is_decode_ahead)
        return plan

    engine.planner.build = counting_build
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    last: dict[str, object] = {}
    step = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            last[out.request_id] = out
        for i, rid in enumerate(ids):
            if (abort_at or {}).get(i) == step:
                engine.abort(rid)
        for req in engine.scheduler._running.values():
            assert req.num_computed_tokens <= req.num_dispatched_tokens <= req.num_tokens + 1
            assert req.num_output_tokens <= req.sampling_params.max_tokens
        step += 1
    assert not engine.inflight  # an idle engine finished the stale decode aheads
    engine.kv_manager.check_integrity()
    llm.shutdown()
    return [last.get(rid) for rid in ids], [num_ahead[rid] for rid in ids]


def same_outputs(a, b) -> None:
    """Identical tokens and finish reasons; logprobs of the same ids within 1e-4 (the batches
    differ, so float sums may round differently)."""
    for x, y in zip(a, b, strict=True):
        assert x.token_ids == y.token_ids
        assert x.finish_reason == y.finish_reason
        for lx, ly in ((x.logprobs, y.logprobs), (x.prompt_logprobs, y.prompt_logprobs)):
            assert (lx is None) == (ly is None)
            for ex, ey in zip(lx or [], ly or [], strict=True):
                assert (ex is None) == (ey is None)
                assert ex is None or (ex.keys() == ey.keys() and all(abs(ex[t] - ey[t]) < ATOL for t in ex))


def test_greedy_logprobs_match_hf(tiny_model_dir):
    """The core exactness check with async on, mixed steps and small chunks."""
    check_against_hf(NAME, tiny_model_dir(NAME), chunk_size=7, max_num_batched_tokens=16, block_size=4)


def test_mid_batch_finishes_and_limits(tiny_model_dir):
    """Requests end by max_tokens (1, 2, 9), a stop token id, eos and max_model_len while others
    continue; logprobs (top-3 and prompt) identical on and off."""
    model_dir = tiny_model_dir(NAME)
    base = SamplingParams(temperature=0, ignore_eos=True, max_tokens=20, logprobs=3)
    probe, _ = run_engine(model_dir, False, [base] * 4)
    stop_tok = probe[1].token_ids[6]  # the 7th token of request 1 (greedy)
    eos_tok = probe[2].token_ids[3]
    params = [
        SamplingParams(temperature=0, ignore_eos=True, max_tokens=1, prompt_logprobs=2),
        SamplingParams(temperature=0, ignore_eos=True, max_tokens=20, stop_token_ids=[stop_tok], logprobs=3),
        SamplingParams(temperature=0, max_tokens=2),
        SamplingParams(temperature=0, ignore_eos=True, max_tokens=9, logprobs=0),
    ]
    outs = {}
    for on in (False, True):
        outs[on], num_ahead = run_engine(model_dir, on, params)
        assert (sum(num_ahead) > 0) is on
    same_outputs(outs[False], outs[True])
    assert [len(o.token_ids) for o in outs[True]] == [1, probe[1].token_ids.index(stop_tok) + 1, 2, 9]
    assert outs[True][1].finish_reason == "stop"

    # eos mid-batch; request 0 reaches max_model_len and max_tokens together
    long = SamplingParams(temperature=0, ignore_eos=True, max_tokens=12)
    params_eos = [long, base, SamplingParams(temperature=0, max_tokens=20, logprobs=3), base]
    for on in (False, True):
        outs[on], _ = run_engine(model_dir, on, params_eos, max_model_len=37 + 12, eos_override=eos_tok)
    same_outputs(outs[False], outs[True])
    assert outs[True][0].finish_reason == "length" and len(outs[True][0].token_ids) == 12
    assert outs[True][2].finish_reason == "stop" and outs[True][2].token_ids[-1] == eos_tok


def test_abort_mid_stream(tiny_model_dir):
    model_dir = tiny_model_dir(NAME)
    params = [SamplingParams(temperature=0, ignore_eos=True, max_tokens=16, logprobs=1)] * 4
    ref, _ = run_engine(model_dir, False, params)
    for on in (False, True):
        outs, num_ahead = run_engine(model_dir, on, params, abort_at={0: 5, 2: 9})
        assert all(n > 0 for n in num_ahead) is on
        same_outputs([outs[1], outs[3]], [ref[1], ref[3]])
        for i in (0, 2):
            assert outs[i].token_ids == ref[i].token_ids[: len(outs[i].token_ids)]
    # every request aborted with decode aheads in flight: the engine goes idle with nothing in
    # flight (run_engine checks it) and every block back
    _, num_ahead = run_engine(model_dir, True, params, abort_at={0: 6, 1: 6, 2: 6, 3: 6})
    assert sum(num_ahead) > 0


def test_seeded_sampling_and_history(tiny_model_dir):
    """Seeded sampling, repetition / presence / frequency penalties and min_tokens: the worker
    feeds the token histories the true tokens of decode aheads."""
    model_dir = tiny_model_dir(NAME)
    params = [
        SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=14, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0, repetition_penalty=1.8, max_tokens=14, ignore_eos=True),
        SamplingParams(temperature=0.8, seed=3, presence_penalty=1.5, frequency_penalty=0.5, max_tokens=14),
        SamplingParams(temperature=0, min_tokens=10, max_tokens=14, stop_token_ids=[5, 6, 7, 8, 9]),
    ]
    off, _ = run_engine(model_dir, False, params)
    on, num_ahead = run_engine(model_dir, True, params)
    assert all(n > 5 for n in num_ahead), num_ahead
    same_outputs(off, on)


def test_preemption_and_prefix_caching(tiny_model_dir):
    """A KV cache too small for all requests (recompute preemption), then a second wave
    sharing the first one's prefixes (prefix-cache hits)."""
    model_dir = tiny_model_dir(NAME)
    params = [SamplingParams(temperature=0, ignore_eos=True, max_tokens=24, logprobs=1)] * 4
    probe = LLM(model=str(model_dir), dtype="float32", device=TEST_DEVICE, kv_cache_memory_gb=0.01)
    bytes_per_block = 4 * probe.engine.config.model.kv_bytes_per_token
    probe.shutdown()
    small = {"kv_cache_memory_gb": 24 * bytes_per_block / 2**30}  # 96 tokens for ~160 needed
    outs = {on: run_engine(model_dir, on, params, **small)[0] for on in (False, True)}
    same_outputs(outs[False], outs[True])
    assert sum(o.num_preemptions for o in outs[True]) > 0

    prompts = make_prompts(320, lens=LENS)
    wave = [p + p[:9] for p in prompts] + prompts
    outs = {on: run_engine(model_dir, on, params * 2, prompts=wave)[0] for on in (False, True)}
    same_outputs(outs[False], outs[True])
    assert sum(o.num_cached_tokens for o in outs[True]) > 0


def test_scheduler_decodes_ahead_within_limits():
    """Scheduler alone: a decode ahead only while the sampling chunk is in flight, never past
    max_tokens or max_model_len; the counters' invariant holds."""
    kv = KVCacheManager(CacheConfig(block_size=4, num_blocks_per_group=(64,)))
    cfg = SchedulerConfig(max_model_len=14, max_num_batched_tokens=64, async_scheduling=True)
    sched = Scheduler(cfg, kv)
    a = Request("a", [1, 2, 3], SamplingParams(max_tokens=3))
    b = Request("b", [1] * 10, SamplingParams(max_tokens=4))  # max_model_len ends it first
    for r in (a, b):
        sched.add_request(r)
    steps = [sched.schedule()]
    num_tokens = {"a": [], "b": []}
    while sched.has_unfinished_requests() or steps:
        nxt = sched.schedule()
        if not nxt.is_empty:
            steps.append(nxt)
        for c in nxt.chunks:
            num_tokens[c.request.request_id].append(c.end)
            assert c.end <= c.request.num_tokens + 1
        if not steps:
            break
        done = steps.pop(0)
        sched.update_from_output(done, {c.request.request_id: 9 for c in done.chunks if c.sample})
        for r in (a, b):
            assert r.num_computed_tokens <= r.num_dispatched_tokens <= r.num_tokens + 1
    assert a.output_token_ids == [9, 9, 9] and a.status.finish_reason == "length"
    assert b.num_tokens == 14 and b.status.finish_reason == "length"
    assert num_tokens["a"] == [4, 5] and num_tokens["b"] == [11, 12, 13]  # decode aheads, none past
    off = Scheduler(SchedulerConfig(max_model_len=14, max_num_batched_tokens=64), kv)
    c = Request("c", [1, 2, 3], SamplingParams(max_tokens=3))
    off.add_request(c)
    off.schedule()
    assert off.schedule().is_empty  # synchronous: nothing until the step is processed


def test_flag_is_a_no_op_with_a_pipeline(tiny_model_dir):
    """On by default, for one device and tp x kvp workers (local or torchrun); resolved off
    with spp > 1 (the pipeline keeps its own micro-batches in flight)."""
    model_dir = tiny_model_dir(NAME)
    model_cfg = ModelConfig.from_pretrained(model_dir, torch.float32)
    for args, expected in (
        (EngineArgs(), True),
        (EngineArgs(async_scheduling=False), False),
        (EngineArgs(tp=2), True),
        (EngineArgs(kvp=3), True),
        (EngineArgs(tp=2, kvp=2), True),
        (EngineArgs(spp=2), False),
        (EngineArgs(spp=2, kvp=2), False),
        (EngineArgs(driver_address="tcp://127.0.0.1:5999"), True),
    ):
        cfg = args.engine_config_for(model_dir, model_cfg, "cpu", 1 << 20)
        assert cfg.scheduler.async_scheduling is expected, args


def test_worker_takes_the_next_plan_before_it_reports_the_last():
    """A reporting rank whose plan n is still on the device takes plan n+1 as soon as it
    arrives (launched before plan n is reported); when plan n ends first, it reports then."""
    from mnemosyne.worker.main import _next_message

    class Channel:
        def __init__(self, arrives_after: int, msg: str) -> None:
            self.calls, self.arrives_after, self.msg = 0, arrives_after, msg

        def try_recv(self):
            self.calls += 1
            return self.msg if self.calls > self.arrives_after else None

        def recv(self):
            return self.msg

    class Pending:
        def __init__(self, ready_after: int) -> None:
            self.checks, self.ready_after = 0, ready_after

        def ready(self) -> bool:
            self.checks += 1
            return self.checks > self.ready_after

    assert _next_message(Channel(2, "plan n+1"), Pending(10)) == "plan n+1"  # device still busy
    assert _next_message(Channel(10, "plan n+1"), Pending(2)) is None  # plan n ended first: report it
    assert _next_message(Channel(0, "plan n+1"), Pending(0)) is None  # ready (CPU): report at once
    assert _next_message(Channel(5, "plan"), None) == "plan"  # nothing pending: wait for the driver


def test_worker_reports_a_decode_step_before_an_eager_launch():
    """After a decode-only plan, a plan that launches eagerly goes out after the decode plan's
    ids (they would otherwise wait for the whole launch); any other plan goes first."""
    from mnemosyne.parallel.messages import StepDone
    from mnemosyne.wire.plan import StepPlan, StepResult
    from mnemosyne.worker.main import _run_plan

    events: list[str] = []

    class Worker:
        def __init__(self, eager: bool) -> None:
            self.eager = eager

        def reports_previous_first(self, plan: StepPlan) -> bool:
            return self.eager

        def execute_async(self, plan: StepPlan) -> str:
            events.append(f"launch {plan.step_id}")
            return f"pending {plan.step_id}"

    class Channel:
        def send(self, msg: StepDone) -> None:
            events.append(f"report {msg.result.step_id}")

    class Pending:
        def wait(self) -> StepResult:
            return StepResult(step_id=1)

    for eager, order in ((False, ["launch 2", "report 1"]), (True, ["report 1", "launch 2"])):
        events.clear()
        assert _run_plan(Worker(eager), Channel(), 0, StepPlan(2, ()), Pending()) == "pending 2"
        assert events == order
    events.clear()
    assert _run_plan(Worker(True), Channel(), 0, StepPlan(3, ()), None) == "pending 3"  # nothing to report
    assert events == ["launch 3"]


def test_report_first_rule_of_a_worker():
    """`Worker.reports_previous_first` without a model: on CUDA a later pipeline stage always
    reports first (its launch can wait for the stage before, which needs the next plan the
    driver sends on this report); the first stage only before an eager launch after a
    decode-only plan; on CPU never (a plan has run when its launch returns)."""
    from types import SimpleNamespace

    from mnemosyne.wire.plan import ChunkPlan, StepPlan
    from mnemosyne.worker.worker import Worker

    def plan(step_id: int, start: int, num_tokens: int) -> StepPlan:
        chunk = ChunkPlan("r", start, num_tokens, True, tuple(range(num_tokens)), (), 0, ())
        return StepPlan(step_id, (chunk,))

    decode, prefill = plan(1, 7, 1), plan(2, 0, 64)

    def worker(device: str, first_stage: bool, previous_decode_only: bool) -> Worker:
        w = Worker.__new__(Worker)  # the rule reads only these
        w.device, w.pg = torch.device(device), SimpleNamespace(is_first_stage=first_stage)
        w._previous_decode_only, w.piecewise = previous_decode_only, SimpleNamespace(max_tokens=32)
        return w

    for plan in (decode, prefill):
        for previous_decode_only in (False, True):
            assert worker("cuda", False, previous_decode_only).reports_previous_first(plan)
            assert not worker("cpu", False, previous_decode_only).reports_previous_first(plan)
            first = worker("cuda", True, previous_decode_only).reports_previous_first(plan)
            assert first is (previous_decode_only and plan is prefill)


def test_one_device_keeps_an_eager_launch_until_the_decode_step_is_read(tiny_model_dir):
    """One device (`UniProcExecutor`): a plan that should wait for the decode step before it
    (`Worker.reports_previous_first`, true on CUDA only; forced here for every prefill plan
    after a decode-only one) is launched only once the engine has read that step: later
    prompts arriving while others decode take that path. Tokens and logprobs are unchanged."""
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2) for _ in LENS]
    prompts = make_prompts(128, lens=LENS)
    reference, _ = run_engine(tiny_model_dir(NAME), True, params, prompts=prompts)

    llm = LLM(model=str(tiny_model_dir(NAME)), dtype="float32", device=TEST_DEVICE, chunk_size=8,
              max_num_batched_tokens=24, block_size=4)  # fmt: skip
    engine, executor = llm.engine, llm.engine.executor
    worker = executor.worker
    worker.reports_previous_first = lambda plan: worker._previous_decode_only and not plan.is_decode_only
    events: list[tuple[str, int]] = []
    launch, read = worker.execute_async, executor.get_result

    def logged_launch(plan):
        events.append(("launch", plan.step_id))
        return launch(plan)

    def logged_read():
        result = read()
        events.append(("read", result.step_id))
        return result

    worker.execute_async, executor.get_result = logged_launch, logged_read
    ids = [engine.add_request(prompts[0], params[0])]
    last: dict[str, object] = {}
    while engine.has_unfinished_requests():
        if len(ids) == 1 and len(getattr(last.get(ids[0]), "token_ids", ())) >= 3:  # it decodes: the others arrive
            ids += [engine.add_request(p, sp) for p, sp in zip(prompts[1:], params[1:], strict=True)]
        for out in engine.step():
            last[out.request_id] = out
    llm.shutdown()
    kept = [
        i for i, (kind, sid) in enumerate(events)
        if kind == "launch" and i > 0 and events[i - 1] == ("read", sid - 1)
    ]  # fmt: skip
    assert kept, events  # some launch waited for the read of the step before it
    assert [sid for kind, sid in events if kind == "launch"] == sorted(sid for kind, sid in events if kind == "launch")
    same_outputs([last[rid] for rid in ids], reference)


def test_last_outputs_come_before_the_idle_integrity_check(tiny_model_dir, monkeypatch):
    """The step that finishes the last request returns without checking the KV pools (O(blocks):
    it held that request's last token back); the check runs once per idle period, on request."""
    llm = LLM(model=str(tiny_model_dir(NAME)), dtype="float32", device=TEST_DEVICE, block_size=4)
    engine = llm.engine
    checks = []
    monkeypatch.setattr(engine.kv_manager, "check_integrity", lambda: checks.append(len(checks)))
    engine.add_request([3, 4, 5, 6, 7], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert not engine.check_idle_integrity()  # busy: nothing to check
    finished = False
    while engine.has_unfinished_requests():
        finished = any(out.finished for out in engine.step())
        assert checks == []
    assert finished and not engine.inflight
    assert engine.check_idle_integrity() and checks == [0]
    assert not engine.check_idle_integrity()  # once per idle period
    llm.generate([[3, 4, 5]], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), use_tqdm=False)
    assert checks == [0, 1]  # generate checks once at its end
    llm.shutdown()
