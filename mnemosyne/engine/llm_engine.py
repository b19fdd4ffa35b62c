"""The engine: add requests, step, abort. One step is schedule -> execute -> process.

Request lifecycle::

    add_request ──validate──> WAITING ──schedule──> RUNNING ──┬─ eos / stop ids / stop string ─> FINISHED_STOPPED
         │ (bad input:              ^                │        ├─ max_tokens / max_model_len ───> FINISHED_LENGTH
         │  InvalidRequestError,    └── preempted ───┘        └─ abort ────────────────────────> FINISHED_ABORTED
         │  nothing enqueued)         (KV freed, recomputed later)
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from pathlib import Path

import numpy as np

from mnemosyne.config import EngineConfig, GenerationConfigMode
from mnemosyne.engine.args import EngineArgs
from mnemosyne.engine.detokenizer import IncrementalDetokenizer
from mnemosyne.engine.policies import make_policies
from mnemosyne.engine.prefill_lane import LANE_POLL_S, LaneDriver
from mnemosyne.engine.priority import ttft_deadline_s
from mnemosyne.engine.scheduler import Scheduler
from mnemosyne.engine.scheduler_output import SchedulerOutput
from mnemosyne.engine.step_load import step_composition
from mnemosyne.engine.step_log import StepLog
from mnemosyne.engine.step_plan import PlanBuilder
from mnemosyne.errors import InvalidRequestError
from mnemosyne.executor import Executor, make_executor
from mnemosyne.kv_cache.manager import KVCacheManager
from mnemosyne.latency.beside_lane import lane_chunk_alone_s
from mnemosyne.latency.composition import StepComposition
from mnemosyne.models.generation_config import load_generation_defaults
from mnemosyne.outputs import EngineStats, RequestOutput, RequestTiming, StepStats
from mnemosyne.request import Request, RequestStatus, check_token_ids
from mnemosyne.sampling_params import SamplingParams
from mnemosyne.wire.plan import StepResult


def load_tokenizer(model_dir: str | Path, chat_template: str | None = None):  # -> PreTrainedTokenizerBase | None
    """The HF tokenizer of a model directory (with `chat_template` replacing its own when
    given), or None when it ships none."""
    path = Path(model_dir)
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def _same(items: list) -> list:
    return items


class LLMEngine:
    """Schedules on the driver; runs micro-batches through an `Executor`.

    With a pipeline (spp > 1) up to `parallel.max_inflight` micro-batches are in
    flight: the next chunk of a prompt is scheduled while earlier ones are still
    in later stages, and results come back in order.

    With async scheduling (spp == 1: one device, or tp x kvp worker processes) two are:
    each step schedules, builds and launches (or, with workers, sends) step n+1 while the
    devices run step n, and only then waits for step n's tokens and processes them::

        host    | schedule n+1 | plan n+1 | launch n+1 | wait n | process n | schedule n+2 | ...
        device  | ............ step n ................ | step n+1 ....................... | ...

    Step n+1 may hold decode aheads, whose input tokens step n samples (engine/decode_ahead.py
    draws it); what step n finishes, step n+1's chunks of it are dropped.
    """

    def __init__(
        self, config: EngineConfig, tokenizer=None, detokenize: bool = True, copy_outputs: bool = True
    ) -> None:
        """`detokenize=False`: outputs carry token ids only and stop strings are the caller's
        (the engine core of `mnemosyne serve`: its API server detokenizes).
        `copy_outputs=False`: a RequestOutput's token ids, logprobs and token times are the
        request's own lists, valid until the next step (the engine core sends only what each
        step added): no per-step copy that grows with the output."""
        self.config = config
        self.tokenizer = tokenizer
        self.detokenize = detokenize
        self.copy_outputs = copy_outputs
        # Sampling fields a request leaves out (None) take these, else SamplingParams' fallbacks.
        self.generation_defaults = (
            load_generation_defaults(config.model_dir)
            if config.generation_config is GenerationConfigMode.AUTO
            else {}
        )
        self.kv_manager = KVCacheManager(config.cache)
        self.policies = make_policies(config, self.kv_manager)
        self.scheduler = Scheduler(
            config.scheduler, self.kv_manager, self.policies.chunk_policy, self.policies.priority
        )
        self.planner = PlanBuilder(self.scheduler, self.kv_manager)
        self.executor: Executor = make_executor(config)
        self.max_inflight = config.max_inflight
        self._inflight: deque[SchedulerOutput] = deque()
        # (predicted_s, submitted at time.monotonic(), composition, host_s, idle_start) of each
        # micro-batch in flight; host_s: the host's time from the latest result to this
        # submission (None after idling); idle_start: nothing was in flight when it was submitted
        self._inflight_timing: deque[tuple[float, float, StepComposition, float | None, bool]] = deque()
        self._step_stats: list[StepStats] = []  # processed steps not yet taken by take_step_stats
        self.step_log = StepLog(config.step_log, config, time.monotonic()) if config.step_log else None
        self.lane: LaneDriver | None = None  # the prefill lane (engine/prefill_lane.py)
        if config.scheduler.prefill_lane is not None:
            from mnemosyne.executor.uniproc import UniProcExecutor

            assert isinstance(self.executor, UniProcExecutor)  # one device (EngineConfig checks)
            assert self.policies.lane_split is not None  # made with every lane
            chunk_tokens = config.scheduler.prefill_lane.chunk_tokens
            self.lane = LaneDriver(
                self.scheduler, self.planner, self.executor, self._process,
                lambda sched: lane_chunk_alone_s(
                    self.policies.latency_model, step_composition(self.kv_manager, sched), chunk_tokens
                ), self.step_log, self.policies.lane_split,
            )  # fmt: skip
        self._last_result_time = 0.0  # time.monotonic() when the latest step's result arrived
        self._busy_since_result = False  # a result arrived and the engine has not idled since
        self._integrity_check_due = False  # went idle since the KV pools were last checked
        self._requests: dict[str, Request] = {}
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._prompts: dict[str, str | None] = {}
        self._ttft_deadlines_s: dict[str, float] = {}  # fixed per request: computed once
        self._ids = itertools.count()

    @classmethod
    def from_args(cls, args: EngineArgs) -> LLMEngine:
        config = args.create_engine_config()
        return cls(config, load_tokenizer(config.model_dir, config.chat_template))

    # ---- requests ---------------------------------------------------------------------

    def tokenize(self, prompt: str | list[int] | np.ndarray) -> np.ndarray:
        """The prompt's token ids as a read-only TOKEN_ID_DTYPE array, checked against the
        vocabulary (InvalidRequestError): text through the tokenizer; ids as given, a list or
        a 1-D integer array (the engine core's wire form, checked without a copy). Never a
        list: a 262K-token prompt's `tolist` held the step after its arrival ~10 ms."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("this model has no tokenizer: pass prompt token ids")
            token_ids = list(self.tokenizer.encode(prompt))
        else:
            token_ids = prompt
        return check_token_ids(token_ids, self.config.model.vocab_size)

    def add_request(
        self,
        prompt: str | list[int] | np.ndarray,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        arrival_time: float | None = None,
    ) -> str:
        """Validate and enqueue. Raises InvalidRequestError (nothing enqueued) on bad input."""
        params = params or SamplingParams()
        params.validate()
        params = params.resolved(self.generation_defaults)
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        token_ids = self.tokenize(prompt)
        vocab = self.config.model.vocab_size
        if any(t >= vocab for t in params.logit_bias):
            raise InvalidRequestError(f"logit_bias token ids must be in [0, {vocab})")
        eos = () if params.ignore_eos else self.config.model.eos_token_ids
        if self.tokenizer is not None and not params.ignore_eos and self.tokenizer.eos_token_id is not None:
            eos = tuple(dict.fromkeys((*eos, self.tokenizer.eos_token_id)))
        req = Request(request_id, token_ids, params, eos_token_ids=eos)
        if arrival_time is not None:
            req.arrival_time = arrival_time
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = [None]
        self.scheduler.add_request(req)  # raises on over-long / empty prompts
        self._requests[request_id] = req
        self._prompts[request_id] = prompt if isinstance(prompt, str) else None
        self._ttft_deadlines_s[request_id] = self.ttft_deadline_s(req.num_prompt_tokens)
        if self.tokenizer is not None and self.detokenize:
            self._detok[request_id] = IncrementalDetokenizer.for_prompt(
                self.tokenizer, token_ids, params.skip_special_tokens, params.stop
            )
        return request_id

    def abort(self, request_id: str) -> None:
        req = self.scheduler.finish_request(request_id, RequestStatus.FINISHED_ABORTED)
        if req is not None:
            self._forget(request_id)
            if not self.scheduler.has_unfinished_requests():
                self._go_idle()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            num_preemptions=self.scheduler.num_preemptions,
            kv_cache_usage=tuple(self.kv_manager.usage()),
            prefix_cache_queries=self.kv_manager.prefix_cache_stats.num_query_tokens,
            prefix_cache_hits=self.kv_manager.prefix_cache_stats.num_hit_tokens,
            num_cached_blocks=self.kv_manager.num_cached_blocks,
            num_lane_chunks=self.scheduler.num_lane_chunks,
            lane_steps_sms=(self.lane.steps_sms or 0) if self.lane is not None else 0,
        )

    # ---- the step ---------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Fill the pipeline with newly scheduled micro-batches, then finish the oldest (and
        advance the prefill lane, if any)."""
        outputs = self._advance_lane(0.0)
        while len(self._inflight) < self.max_inflight:
            sched = self.scheduler.schedule()
            if sched.is_empty:
                break
            composition, predicted_s = self.predict_step(sched)
            submitted = time.monotonic()
            host_s = submitted - self._last_result_time if self._busy_since_result else None
            idle_start = not self._inflight  # the device has nothing to run before it
            self._inflight_timing.append((predicted_s, submitted, composition, host_s, idle_start))
            self.executor.submit(self.planner.build(sched))
            self._inflight.append(sched)
        if not self._inflight:
            if self.scheduler.lane_busy:
                outputs += self._advance_lane(LANE_POLL_S)
            return outputs
        waited_from = time.monotonic()
        result = self.executor.get_result()
        now = time.monotonic()
        sched = self._inflight.popleft()
        predicted_s, submitted, composition, host_s, idle_start = self._inflight_timing.popleft()
        started = submitted
        if self.config.scheduler.async_scheduling:  # the device began it when the step before ended
            started = max(started, self._last_result_time)
        self._last_result_time = now
        self._busy_since_result = True
        chunk_sizes = tuple(c.num_tokens for c in sched.chunks if c.num_tokens > 1)
        self._step_stats.append(StepStats(predicted_s, now - started, chunk_sizes))
        beside_lane = self.scheduler.lane_busy
        if self.step_log is not None:
            self.step_log.write(
                now, now - started, predicted_s, sched, host_s, result.trace, idle_start, beside_lane, now - waited_from
            )
        if beside_lane:
            if self.lane is not None:
                self.lane.observe_step(composition, result.trace, now - started)
        elif self.policies.calibration is not None:
            self.policies.calibration.observe(composition, predicted_s, submitted, now)
        del self._step_stats[:-1024]  # nobody reading: keep the newest only
        outputs += self._process(sched, result)
        if not self.scheduler.has_unfinished_requests():
            self._go_idle()
        return outputs

    def _advance_lane(self, timeout_s: float) -> list[RequestOutput]:
        """Process the prefill lane's chunks done within `timeout_s`, launch its next ones."""
        if self.lane is None:
            return []
        return self.lane.advance(timeout_s)

    def _go_idle(self) -> None:
        """No request left: finish the micro-batches still in flight (all their chunks are
        stale: async scheduling's decode aheads of requests that just ended), so that an idle
        engine has nothing in flight. The KV pools' check waits for `check_idle_integrity`."""
        while self._inflight:
            self.executor.get_result()
            self._inflight.popleft()
            self._inflight_timing.popleft()
        if self.lane is not None:
            self.lane.drain()  # an aborted request's chunks: its KV is freed when they are done
        self._busy_since_result = False
        self._integrity_check_due = True

    def check_idle_integrity(self) -> bool:
        """Check the KV pools (`KVCacheManager.check_integrity`) once per idle period: when the
        engine went idle since the last check and still has no request. Call it once the step's
        outputs are delivered (the engine core does, when no message waits; `LLM.generate`,
        `mnemosyne generate` and `bench latency` at their ends). Inside `step()` the check
        (O(blocks): 74 ms for 58.6K blocks on a 2-core CPU) held back the last token of the
        last request before every idle period (the 1B serving trace on an H200: that token
        reached the client a median 29 ms, up to 72 ms, after the one before, against 1-2 ms
        between the engine's steps; benchmarks/results/README.md, "Fourteenth session").
        Returns whether it checked."""
        if not self._integrity_check_due or self.scheduler.has_unfinished_requests():
            return False
        self._integrity_check_due = False
        self.kv_manager.check_integrity()
        return True

    def predict_step(self, sched: SchedulerOutput) -> tuple[StepComposition, float]:
        """A scheduled step's composition (its KV already allocated) and the latency model's
        uncorrected prediction of its seconds (what online calibration compares against)."""
        composition = step_composition(self.kv_manager, sched)
        return composition, self.policies.latency_model.step_time_s(composition)

    def take_step_stats(self) -> list[StepStats]:
        """Steps processed since the last call (at most the newest 1024), oldest first."""
        stats, self._step_stats = self._step_stats, []
        return stats

    def predicted_remaining_prefill_s(self, request_id: str) -> float | None:
        """Predicted seconds until the request's prefill completes alone; None if unknown."""
        req = self.scheduler.get_request(request_id)
        if req is None:
            return None
        return self.policies.prefill_time.remaining_s(req.num_tokens, req.num_computed_tokens)

    def ttft_deadline_s(self, num_prompt_tokens: int) -> float:
        pc = self.config.policy
        return ttft_deadline_s(self.policies.prefill_time, num_prompt_tokens, pc.deadline_factor, pc.min_deadline_s)

    @property
    def inflight(self) -> tuple[SchedulerOutput, ...]:
        """Micro-batches submitted and not yet processed, oldest first."""
        return tuple(self._inflight)

    def _process(self, sched: SchedulerOutput, result: StepResult) -> list[RequestOutput]:
        now = time.monotonic()
        applied = self.scheduler.update_from_output(sched, result.sampled_token_ids).applied
        for chunk in applied:
            req = chunk.request
            rid = req.request_id
            if rid in result.prompt_logprobs:
                first_pos, entries = result.prompt_logprobs[rid]
                if first_pos == req.num_prompt_logprobs_done:
                    req.prompt_logprobs.extend(entries)
                    req.num_prompt_logprobs_done = first_pos + len(entries)
            if chunk.sample and rid in result.logprobs:
                req.logprobs.append(result.logprobs[rid])

        outputs: list[RequestOutput] = []
        for chunk in applied:
            req = chunk.request
            new_ids: list[int] = []
            if chunk.sample and req.request_id in result.sampled_token_ids:
                new_ids = [req.output_token_ids[-1]]
                req.token_times.append(now)
                req.first_token_time = req.first_token_time or now
                detok = self._detok.get(req.request_id)
                check_stop = req.num_output_tokens >= req.sampling_params.min_tokens
                if detok is not None and detok.add_token(new_ids[0], check_stop) and not req.status.finished:
                    self.scheduler.finish_request(req.request_id, RequestStatus.FINISHED_STOPPED)
            outputs.append(self._make_output(req, new_ids, now))
            if req.status.finished:
                self._forget(req.request_id)
        return outputs

    def _make_output(self, req: Request, new_ids: list[int], now: float) -> RequestOutput:
        finished = req.status.finished
        detok = self._detok.get(req.request_id)
        params = req.sampling_params
        own = list if self.copy_outputs else _same
        return RequestOutput(
            request_id=req.request_id,
            prompt=self._prompts.get(req.request_id),
            prompt_token_ids=req.prompt_token_ids,
            token_ids=own(req.output_token_ids),
            text=detok.text if detok is not None else "",
            finished=finished,
            finish_reason=req.status.finish_reason,
            logprobs=own(req.logprobs) if params.logprobs is not None else None,
            prompt_logprobs=own(req.prompt_logprobs) if params.prompt_logprobs is not None else None,
            timing=RequestTiming(
                arrival_time=req.arrival_time,
                first_token_time=req.first_token_time,
                token_times=own(req.token_times),
                finished_time=now if finished else None,
                ttft_deadline_s=self._ttft_deadlines_s[req.request_id],
            ),
            delta_text=detok.take_delta(finished) if detok is not None else "",
            delta_token_ids=new_ids,
            num_preemptions=req.num_preemptions,
            num_computed_tokens=req.num_computed_tokens,
            num_cached_tokens=req.num_cached_tokens or 0,
        )

    def _forget(self, request_id: str) -> None:
        for table in (self._requests, self._detok, self._prompts, self._ttft_deadlines_s):
            table.pop(request_id, None)

    # ---- lifetime ---------------------------------------------------------------------

    def check_health(self) -> None:
        """Raise WorkerError if a worker failed, died or froze (for callers that sit idle)."""
        self.executor.check_health()

    def shutdown(self) -> None:
        """Stop the workers (a no-op on one device). The engine is unusable afterwards."""
        if self.step_log is not None:
            self.step_log.close()
        self.executor.shutdown()

    def __enter__(self) -> LLMEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
