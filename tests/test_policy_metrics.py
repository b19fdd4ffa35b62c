"""Scheduling metrics (step-time ratio, chunk sizes, SLO counters) and the prefill progress line."""

from __future__ import annotations

from mnemosyne.engine.prefill_progress import PrefillProgressLog
from mnemosyne.outputs import RequestOutput, RequestTiming, StepStats
from mnemosyne.server.metrics import ServerMetrics


def _out(
    rid: str, prompt_len: int, computed: int, times: list[float], deadline: float | None
) -> RequestOutput:
    timing = RequestTiming(arrival_time=0.0, first_token_time=times[0] if times else None,
                           token_times=times, ttft_deadline_s=deadline)  # fmt: skip
    return RequestOutput(rid, None, [1] * prompt_len, [7] * len(times), "", False, None, None, None, timing,
                         delta_token_ids=[7] * len(times), num_computed_tokens=computed)  # fmt: skip


def test_slo_counters_and_step_histograms():
    m = ServerMetrics("m", 1, tbt_slo_s=0.030)
    m.on_output(_out("a", 10, 10, [0.4, 0.42, 0.5], deadline=0.5))  # TTFT met; gaps 20 ms (met), 80 ms
    m.on_output(_out("b", 10, 10, [0.9], deadline=0.5))  # TTFT missed
    m.on_steps([StepStats(0.010, 0.011, (512, 32)), StepStats(0.020, 0.020, ())])
    text = m.render().decode()
    assert 'mnemosyne:tbt_slo_total{met="true",model_name="m"} 1.0' in text
    assert 'mnemosyne:tbt_slo_total{met="false",model_name="m"} 1.0' in text
    assert 'mnemosyne:ttft_slo_total{met="true",model_name="m"} 1.0' in text
    assert 'mnemosyne:ttft_slo_total{met="false",model_name="m"} 1.0' in text
    assert 'mnemosyne:step_time_predicted_over_actual_count{model_name="m"} 2.0' in text
    assert 'mnemosyne:prefill_chunk_tokens_count{model_name="m"} 2.0' in text


def test_prefill_progress_line_is_rate_limited():
    now = [10.0]
    log = PrefillProgressLog(lambda rid: 12.5, min_prompt_tokens=100, interval_s=5.0, clock=lambda: now[0])
    line = log.on_output(_out("long", 1000, 400, [], None))
    assert line == "prefill long: 400/1000 tokens (40.0%), 40 tok/s, TTFT in ~12.5 s (predicted)"
    now[0] = 12.0
    assert log.on_output(_out("long", 1000, 500, [], None)) is None
    now[0] = 16.0
    assert log.on_output(_out("long", 1000, 600, [], None)) is not None
    assert log.on_output(_out("short", 50, 10, [], None)) is None
