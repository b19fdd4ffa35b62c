"""SimulatedEngine: the engine's own Scheduler, KVCacheManager and policies on a virtual clock.

Nothing of the scheduling is re-implemented: `step` is `LLMEngine.step` with the executor
replaced by the latency model and stage events (`pipeline.py`)::

    while fewer than config.max_inflight micro-batches are in flight:
        sched = scheduler.schedule()            (clock = virtual now; LARS and adaptive chunking
        if empty: stop                           read it)
        done  = pipeline.submit(now, step_timer(composition of sched))
    oldest in flight: now = max(now, its done); calibration.observe(predicted, submit, done);
                      update_from_output

The step timer defaults to the latency model itself, so the online calibration sees
measured == predicted and stays the identity; `step_timer` makes the simulated device differ
from the model the engine predicts with: `scaled_timer` (a known systematic error, actual =
f x predicted) or another profile's model (`mnemosyne simulate --device-latency-profile`: a
profile measured in the run's conditions), which the calibration then learns as on a GPU.

With KVP the composition holds one sub-batch per group plus the merged query tokens
(`engine/step_load.py`); the latency model charges the busiest group and the merge.
Every sampled token is 0 and requests ignore EOS, so each stops at its output length.
Prefix caching is off (a trace carries lengths, not contents). Async scheduling (spp == 1)
keeps two micro-batches in flight as `LLMEngine` does: the next step is scheduled, decodes
ahead included, while one runs, so a request that arrives joins the step after the one
already planned (on a long prefill's 0.3-0.9 s steps, that wait is most of a short request's
TTFT). The device still runs them one after the other (`StagePipeline` with one stage); the
host time async scheduling hides is in the step times of a profile timed as the engine runs
(`profiling/profiler.py`: pipelined, result to result). It is not hidden for a step
submitted with nothing in flight (after the engine idled; every step without async
scheduling), which the device waits for while the host launches it: `idle_step_factor`
slows such a step when it carries a prefill chunk (an eager step of 1-4K tokens after idling:
1.44x its prediction on an H200 for the 1B shape, 1.26x for the 8B; the step log's
`idle_start` steps, `benchmarks/step_log_report.py`).

With a prefill lane (`SchedulerConfig.prefill_lane`, one device) the engine's `LaneDriver`
runs it against `lane.py`'s `VirtualLane`: each step first processes the chunks whose end
the clock has reached and launches the next, as `LLMEngine.step`; a step beside a chunk takes
`BesideLaneLatencyModel.confined_s` (on the split's SMs: the engine plans it within
LANE_STEP_HEADROOM of its target, the device takes the prediction itself) and is noted to the
lane (it slows the chunk); with nothing but the lane in flight the clock moves to the oldest
chunk's end or to the next arrival, whichever is first. `gpu` is the simulated device (its
SM count, and its bandwidth for the steps beside the lane).

A `LoggedDevice` (`device_log.py`, `mnemosyne simulate --device-step-log`) times the steps
instead, from one measured run's step log: a factor per prefix bucket and path for steps
with a chunk, one for such steps submitted with nothing in flight, and a draw from the
measured ratios for each decode-only step. `run_trace`'s `arrival_delay_s` holds every
request back from the scheduler that long after its arrival (its TTFT still counts from
the arrival): the server's HTTP path and the engine core's input, and the first token's
way back, which no step holds (5.5-6.1 ms on H200 hosts for a 1-4K-token prompt:
`benchmarks/ttft_decomposition.py`).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from mnemosyne.config import EngineConfig
from mnemosyne.engine.policies import make_policies
from mnemosyne.engine.prefill_lane import LaneDriver
from mnemosyne.engine.scheduler import Scheduler
from mnemosyne.engine.scheduler_output import SchedulerOutput
from mnemosyne.engine.step_load import step_composition
from mnemosyne.engine.step_plan import PlanBuilder
from mnemosyne.errors import ConfigError
from mnemosyne.kv_cache.manager import KVCacheManager
from mnemosyne.latency.beside_lane import lane_chunk_alone_s
from mnemosyne.latency.composition import StepComposition
from mnemosyne.latency.model import LatencyModel
from mnemosyne.latency.roofline import DeviceSpec
from mnemosyne.request import TOKEN_ID_DTYPE, Request, prompt_array
from mnemosyne.sampling_params import SamplingParams
from mnemosyne.simulator.device_log import LoggedDevice
from mnemosyne.simulator.lane import VirtualLane
from mnemosyne.simulator.pipeline import StagePipeline
from mnemosyne.simulator.trace import TraceRequest

# Seconds a scheduled micro-batch takes to cross every stage (default: the latency model).
StepTimer = Callable[[StepComposition], float]


def scaled_timer(model: LatencyModel, factor: float, chunk_step_factor: float = 1.0) -> StepTimer:
    """A device whose every step takes `factor` x the model's prediction, and a step with a
    prefill chunk `chunk_step_factor` x more: compute-bound steps under a sustained serving
    load, where the GPU holds its power cap at lower clocks than a profile's short bursts
    saw (bandwidth-bound decode-only steps do not slow down)."""
    if factor <= 0 or chunk_step_factor <= 0:
        raise ValueError(f"the latency error factors must be positive, got {factor}, {chunk_step_factor}")

    def timer(composition: StepComposition) -> float:
        has_chunk = any(g.num_chunks for g in composition.groups)
        return factor * (chunk_step_factor if has_chunk else 1.0) * model.step_time_s(composition)

    return timer


@dataclass
class SimulatedRequest:
    request_id: str
    arrival_s: float
    prompt_len: int
    output_len: int
    token_times_s: list[float] = field(default_factory=list)
    finish_s: float | None = None
    num_preemptions: int = 0


@dataclass(frozen=True)
class StepRecord:
    """One processed micro-batch: (request id, start, num_tokens) in schedule order."""

    chunks: tuple[tuple[str, int, int], ...]
    submit_s: float
    done_s: float


class SimulatedEngine:
    def __init__(
        self,
        config: EngineConfig,
        latency_model: LatencyModel,
        latency_source: str = "latency model",
        step_timer: StepTimer | None = None,
        record_steps: bool = False,
        idle_step_factor: float = 1.0,
        device: LoggedDevice | None = None,
        gpu: DeviceSpec | None = None,
    ) -> None:
        if idle_step_factor <= 0:
            raise ValueError(f"the idle step factor must be positive, got {idle_step_factor}")
        if device is not None and (step_timer is not None or idle_step_factor != 1.0):
            raise ValueError("a logged device times the steps itself: no step_timer or idle factor with it")
        self.config = config
        self.now_s = 0.0
        self.kv_manager = KVCacheManager(config.cache)
        self.policies = make_policies(config, self.kv_manager, (latency_model, latency_source), gpu)
        self.scheduler = Scheduler(
            config.scheduler,
            self.kv_manager,
            self.policies.chunk_policy,
            self.policies.priority,
            clock=lambda: self.now_s,
        )
        self.step_timer = step_timer  # None: steps take exactly the predicted time
        self.idle_step_factor = idle_step_factor
        self.device = device
        self.pipeline = StagePipeline(config.parallel.spp)
        self.max_inflight = config.max_inflight  # as LLMEngine
        self.requests: dict[str, SimulatedRequest] = {}
        self.steps: list[StepRecord] | None = [] if record_steps else None
        self.num_steps = 0
        # (sched, composition, predicted_s, submit_s, done_s)
        self._inflight: deque[tuple[SchedulerOutput, StepComposition, float, float, float]] = deque()
        self._prompts: dict[int, np.ndarray] = {}  # one shared read-only id array per prompt length
        self.virtual_lane: VirtualLane | None = None
        self.lane: LaneDriver | None = None
        lane = config.scheduler.prefill_lane
        if lane is not None:
            num_sms = gpu.num_sms if gpu is not None else 0
            if num_sms <= 0:
                raise ConfigError(
                    "simulating the prefill lane needs the GPU's SM count (a --gpu that has one)"
                )
            assert self.policies.lane_split is not None  # made with every lane
            self.virtual_lane = VirtualLane(
                latency_model, num_sms, lane.steps_sms_choices, lambda: self.now_s, lane.chunk_tokens
            )
            self.lane = LaneDriver(
                self.scheduler, PlanBuilder(self.scheduler, self.kv_manager), self.virtual_lane,
                lambda sched, result: self._process_lane(sched),
                lambda sched: lane_chunk_alone_s(
                    latency_model, step_composition(self.kv_manager, sched), lane.chunk_tokens
                ), None, self.policies.lane_split, clock=lambda: self.now_s,
            )  # fmt: skip

    def add_request(
        self, request_id: str, prompt_len: int, output_len: int, arrival_s: float | None = None
    ) -> None:
        arrival = self.now_s if arrival_s is None else arrival_s
        prompt = self._prompts.get(prompt_len)
        if prompt is None:
            prompt = self._prompts[prompt_len] = prompt_array(np.zeros(prompt_len, dtype=TOKEN_ID_DTYPE))
        params = SamplingParams(max_tokens=output_len, ignore_eos=True)
        self.scheduler.add_request(Request(request_id, prompt, params, arrival_time=arrival))
        self.requests[request_id] = SimulatedRequest(request_id, arrival, prompt_len, output_len)

    def has_work(self) -> bool:
        return self.scheduler.has_unfinished_requests() or bool(self._inflight) or self.scheduler.lane_busy

    def step(self, next_arrival_s: float = math.inf) -> bool:
        """One `LLMEngine.step`: fill the pipeline, finish the oldest micro-batch. False when
        nothing was in flight or could be scheduled. With only lane chunks in flight the
        clock moves to the oldest one's end or to `next_arrival_s` (the next request's time
        at the scheduler), whichever is first: the engine's loop takes a request that
        arrives while the lane runs at once, not at the chunk's end."""
        if self.lane is not None:
            self.lane.advance(0.0)
        beside = self.policies.beside_lane
        while len(self._inflight) < self.max_inflight:
            sched = self.scheduler.schedule()
            if sched.is_empty:
                break
            comp = step_composition(self.kv_manager, sched)
            predicted_s = self.policies.latency_model.step_time_s(comp)
            if beside is not None and beside.steps_share is not None:  # beside a lane chunk
                duration_s = beside.confined_s(comp, beside.steps_share)
            elif self.device is not None:
                duration_s = self.device.step_time_s(comp, predicted_s, idle=not self._inflight)
            else:
                duration_s = predicted_s if self.step_timer is None else self.step_timer(comp)
                if not self._inflight and any(g.num_chunks for g in comp.groups):
                    duration_s *= self.idle_step_factor  # an idle device waits for it
            done_s = self.pipeline.submit(self.now_s, duration_s)
            if self.virtual_lane is not None:  # one device: the steps run one after the other
                self.virtual_lane.note_step(done_s - duration_s, done_s)
            self._inflight.append((sched, comp, predicted_s, self.now_s, done_s))
        if not self._inflight:
            if self.lane is None or self.virtual_lane is None or not self.scheduler.lane_busy:
                return False
            end_s = self.virtual_lane.next_end_s
            assert end_s is not None  # the scheduler's lane chunks are the virtual lane's
            # nothing else to run: the lane's next chunk ends, or a request arrives first
            self.now_s = max(self.now_s, min(end_s, next_arrival_s))
            self.lane.advance(0.0)
            return True
        sched, comp, predicted_s, submit_s, done_s = self._inflight.popleft()
        self.now_s = max(self.now_s, done_s)
        # (beside the lane the calibration does not learn: as LLMEngine, only from steps with the device alone)
        if self.policies.calibration is not None and not self.scheduler.lane_busy:
            self.policies.calibration.observe(comp, predicted_s, submit_s, self.now_s)
        self._process(sched, submit_s)
        return True

    def _process_lane(self, sched: SchedulerOutput) -> list:
        """A lane chunk ended: its tokens are computed (it samples nothing)."""
        self.scheduler.update_from_output(sched, {})
        return []

    def _process(self, sched: SchedulerOutput, submit_s: float) -> None:
        self.num_steps += 1
        if self.steps is not None:
            chunks = tuple((c.request.request_id, c.start, c.num_tokens) for c in sched.chunks)
            self.steps.append(StepRecord(chunks, submit_s, self.now_s))
        sampled = {c.request.request_id: 0 for c in sched.chunks if c.sample}
        update = self.scheduler.update_from_output(sched, sampled)
        for chunk in update.applied:
            if chunk.sample:
                self.requests[chunk.request.request_id].token_times_s.append(self.now_s)
        for req in update.finished:
            sim = self.requests[req.request_id]
            sim.finish_s = self.now_s
            sim.num_preemptions = req.num_preemptions


def run_trace(engine: SimulatedEngine, trace: list[TraceRequest], arrival_delay_s: float = 0.0) -> None:
    """Feed the trace at its arrival times (each `arrival_delay_s` later to the scheduler; its
    TTFT counts from its arrival) and step until all finish. Request i of the trace is
    "req-i"; equal arrivals are added in trace order."""
    if arrival_delay_s < 0:
        raise ValueError(f"the arrival delay must be >= 0, got {arrival_delay_s}")
    order = sorted(range(len(trace)), key=lambda i: trace[i].arrival_s)
    k, n = 0, len(order)
    while k < n or engine.has_work():
        while k < n and trace[order[k]].arrival_s + arrival_delay_s <= engine.now_s:
            t = trace[order[k]]
            engine.add_request(f"req-{order[k]}", t.prompt_len, t.output_len, t.arrival_s)
            k += 1
        next_arrival_s = trace[order[k]].arrival_s + arrival_delay_s if k < n else math.inf
        if engine.step(next_arrival_s):
            continue
        if k < n:  # idle: jump to the next arrival
            engine.now_s = max(engine.now_s, trace[order[k]].arrival_s + arrival_delay_s)
            continue
        raise RuntimeError(
            f"simulation stuck at {engine.now_s:.3f} s: {engine.scheduler.num_waiting} waiting requests "
            "cannot be scheduled and nothing is in flight"
        )
