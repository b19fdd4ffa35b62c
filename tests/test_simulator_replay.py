"""The simulator schedules exactly as the real engine does (CPU, gloo, spp=2 x kvp=2).

The real engine runs a tiny model with 4 worker processes: adaptive chunks, a KV cache
small enough to force preemption, requests arriving between steps. We record every
micro-batch it submits (which chunks of which requests, their sizes, in order) and its
measured step times. The simulator, built from the same EngineConfig and the same latency
model, gets the same arrivals at the same step indices and replays the measured times as
its step times; its schedule must be identical, micro-batch by micro-batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from conftest import TEST_DEVICE
from tiny_models import COMMON as TINY_COMMON

from mnemosyne import LLM, SamplingParams
from mnemosyne.latency.composition import StepComposition
from mnemosyne.simulator.engine import SimulatedEngine

BLOCK = 4
NUM_NEW = 12
PROMPT_LENS = (37, 5, 60, 23, 50, 9)
ARRIVAL_STEP = (0, 0, 0, 3, 7, 12)  # request i is added before the engine's step ARRIVAL_STEP[i]
ENGINE = dict(
    dtype="float32",
    device=TEST_DEVICE,
    block_size=BLOCK,
    max_num_batched_tokens=64,
    kv_cache_memory_gb=20 * BLOCK * 512 / 2**30,  # 20 blocks per device: preemption
    worker_timeout_s=60,
    spp=2,
    kvp=2,
    max_tokens_per_kvp_group=40,
    pipeline_depth=3,
    enable_prefix_caching=False,
    chunk_policy="adaptive",
    tbt_slo_ms=4.4,  # the CPU roofline of this model: 4.29 ms at 4 tokens, 4.37 ms at 32
    chunk_granularity=4,
    min_chunk_tokens=4,
    online_calibration=False,  # its corrections come from wall-clock host gaps, not replayable
)

Schedule = list[tuple[tuple[str, int, int], ...]]


def run_real(model_dir) -> tuple[Schedule, list[float], object, object, int]:
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, TINY_COMMON["vocab_size"], (n,), generator=g).tolist() for n in PROMPT_LENS]
    params = SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True)
    schedule: Schedule = []
    with LLM(model=str(model_dir), **ENGINE) as llm:
        engine = llm.engine
        submit = engine.executor.submit

        def recording_submit(plan):
            schedule.append(tuple((c.request_id, c.start, c.num_tokens) for c in plan.chunks))
            submit(plan)

        engine.executor.submit = recording_submit
        step = 0
        while step <= max(ARRIVAL_STEP) or engine.has_unfinished_requests():
            for i, at in enumerate(ARRIVAL_STEP):
                if at == step:
                    engine.add_request(prompts[i], params, request_id=f"req-{i}")
            engine.step()
            step += 1
        measured = [s.actual_s for s in engine.take_step_stats()]
        return (
            schedule,
            measured,
            engine.config,
            engine.policies.latency_model,
            engine.scheduler.num_preemptions,
        )


def run_simulated(
    config, latency_model, measured: list[float]
) -> tuple[Schedule, SimulatedEngine, list[float]]:
    times: Iterator[float] = iter(measured)
    used: list[float] = []

    def replay(_: StepComposition) -> float:
        used.append(next(times))
        return used[-1]

    sim = SimulatedEngine(config, latency_model, "engine's", step_timer=replay, record_steps=True)
    step = 0
    while step <= max(ARRIVAL_STEP) or sim.has_work():
        for i, at in enumerate(ARRIVAL_STEP):
            if at == step:
                sim.add_request(f"req-{i}", PROMPT_LENS[i], NUM_NEW)
        sim.step()
        step += 1
    assert sim.steps is not None
    return [s.chunks for s in sim.steps], sim, used


def test_simulated_schedule_equals_the_real_engine(tiny_model_dir):
    real, measured, config, latency_model, num_preemptions = run_real(tiny_model_dir("llama"))
    assert num_preemptions > 0, "the test meant to force preemption"
    sizes = {n for step in real for _, _, n in step if n > 1}
    assert len(sizes) >= 3, f"the test meant adaptive chunks of several sizes, got {sizes}"
    assert len(measured) == len(real)

    simulated, sim, used = run_simulated(config, latency_model, measured)
    assert simulated == real
    assert used == measured  # every measured time was fed back, in order
    assert sim.scheduler.num_preemptions == num_preemptions
    assert all(len(r.token_times_s) >= NUM_NEW for r in sim.requests.values())
    assert sim.now_s <= sum(measured) + 1e-9  # micro-batches overlapped in the pipeline
