"""Prometheus metrics of the server (prometheus-client, one registry per server).

Request latencies are observed on the server's io thread from each `RequestOutput`'s
timing (stamped in the engine core when the step that sampled the token was processed):

    arrival ──── TTFT ────> token 0 ── TBT ──> token 1 ── TBT ──> ... token n-1 ──> finished
    |<──────────────────────────── e2e latency ───────────────────────────────────>|

Gauges (running/waiting requests, KV-cache use per KVP group, where cached blocks
nobody references count as free, and blocks in the prefix cache) are refreshed after
every engine step. Prefix-cache queries and hits count prompt tokens of admitted requests.
`control_messages_rejected_total{port}` counts control frames dropped (bad HMAC, garbage,
wrong sender) on the engine-core and worker ports. Counters only grow; `requests_finished_total{reason}` counts
stop / length / abort / error, `requests_rejected_total{code}` counts admissions
refused (400 invalid, 400 context length, 503 queue full).

Scheduling: `step_time_predicted_over_actual` (the latency model's accuracy, per step),
`prefill_chunk_tokens` (chunk sizes), `tbt_slo_total{met}` (each gap between tokens
against --tbt-slo-ms) and `ttft_slo_total{met}` (each first token against its request's
LARS deadline, max(deadline_factor * predicted prefill, min_deadline_s)).
"""

from __future__ import annotations

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from mnemosyne.outputs import EngineStats, RequestOutput, StepStats

_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0,
)  # fmt: skip
_TBT_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05,
    0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
)  # fmt: skip

_RATIO_BUCKETS = (0.25, 0.5, 0.7, 0.8, 0.9, 0.95, 1.0, 1.05, 1.1, 1.2, 1.3, 1.5, 2.0, 4.0)
_CHUNK_BUCKETS = (1, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 65536)

PREFIX = "mnemosyne:"
prometheus_client.disable_created_metrics()  # no *_created series next to every counter


class ServerMetrics:
    def __init__(self, model_name: str, num_kvp_groups: int, tbt_slo_s: float = 0.030) -> None:
        self.registry = CollectorRegistry()
        r, labels = self.registry, {"model_name": model_name}
        self._labels = labels

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(PREFIX + name, doc, (*labels, *extra), registry=r)

        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds", "Time to first token.", labels, registry=r,
            buckets=_LATENCY_BUCKETS,
        ).labels(**labels)  # fmt: skip
        self.tbt = Histogram(
            PREFIX + "time_between_tokens_seconds", "Time between consecutive output tokens.", labels,
            registry=r, buckets=_TBT_BUCKETS,
        ).labels(**labels)  # fmt: skip
        self.e2e = Histogram(
            PREFIX + "e2e_request_latency_seconds", "Arrival to last token of finished requests.", labels,
            registry=r, buckets=_LATENCY_BUCKETS,
        ).labels(**labels)  # fmt: skip
        self.running = Gauge(PREFIX + "num_requests_running", "Requests running.", labels, registry=r)
        self.waiting = Gauge(PREFIX + "num_requests_waiting", "Requests waiting.", labels, registry=r)
        self.kv_usage = Gauge(
            PREFIX + "kv_cache_usage_ratio",
            "Fraction of KV blocks in use.",
            (*labels, "kvp_group"),
            registry=r,
        )
        self.preemptions = counter("num_preemptions", "Preemptions by recompute.").labels(**labels)
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of admitted requests.").labels(**labels)
        self.generation_tokens = counter("generation_tokens", "Output tokens generated.").labels(**labels)
        self.finished = counter("requests_finished", "Requests finished, by reason.", ("reason",))
        self.rejected = counter("requests_rejected", "Requests refused at admission, by code.", ("code",))
        self.prefix_cache_queries = counter(
            "prefix_cache_queries", "Prompt tokens looked up in the prefix cache at admission."
        ).labels(**labels)
        self.prefix_cache_hits = counter(
            "prefix_cache_hits", "Prompt tokens found in the prefix cache (KV reused, not computed)."
        ).labels(**labels)
        self.cached_blocks = Gauge(
            PREFIX + "prefix_cache_blocks", "KV blocks holding reusable prefix content, all KVP groups.",
            labels, registry=r,
        ).labels(**labels)  # fmt: skip
        self.lane_chunks = counter(
            "prefill_lane_chunks", "Prompt chunks run in the prefill lane (--prefill-lane-free-sms)."
        ).labels(**labels)
        self._num_lane_chunks = 0
        self.lane_steps_sms = Gauge(
            PREFIX + "prefill_lane_steps_sms",
            "SMs the steps are confined to beside the running prefill lane chunk (0: every SM).",
            labels, registry=r,
        ).labels(**labels)  # fmt: skip
        self._num_preemptions = 0
        self._prefix_cache_queries = 0
        self._prefix_cache_hits = 0
        self.step_time_ratio = Histogram(
            PREFIX + "step_time_predicted_over_actual", "Latency model's predicted / measured step time.",
            labels, registry=r, buckets=_RATIO_BUCKETS,
        ).labels(**labels)  # fmt: skip
        self.chunk_size = Histogram(
            PREFIX + "prefill_chunk_tokens", "Tokens per prefill chunk.", labels, registry=r,
            buckets=_CHUNK_BUCKETS,
        ).labels(**labels)  # fmt: skip
        self.tbt_slo = counter("tbt_slo", "Gaps between tokens, by whether they met the TBT SLO.", ("met",))
        self.ttft_slo = counter("ttft_slo", "First tokens, by whether they met their TTFT deadline.", ("met",))
        self._tbt_slo_s = tbt_slo_s
        for met in ("true", "false"):
            self.tbt_slo.labels(**labels, met=met)
            self.ttft_slo.labels(**labels, met=met)
        self.control_rejected = counter(
            "control_messages_rejected",
            "Control messages dropped (bad HMAC, garbage, wrong sender), by port: engine "
            "(this server's engine-core port) or workers (the engine core's worker port).",
            ("port",),
        )
        for port in ("engine", "workers"):
            self.control_rejected.labels(**labels, port=port)
        for g in range(num_kvp_groups):
            self.kv_usage.labels(**labels, kvp_group=str(g)).set(0.0)
        for reason in ("stop", "length", "abort", "error"):
            self.finished.labels(**labels, reason=reason)

    # ---- the server's io thread ----------------------------------------------------------------

    def on_admitted(self, num_prompt_tokens: int) -> None:
        self.prompt_tokens.inc(num_prompt_tokens)

    def on_rejected(self, code: str) -> None:
        self.rejected.labels(**self._labels, code=code).inc()

    def on_output(self, out: RequestOutput) -> None:
        n = len(out.delta_token_ids)
        if n:
            self.generation_tokens.inc(n)
            times = out.timing.token_times
            first = len(times) - n
            for i in range(first, len(times)):
                if i == 0:
                    ttft = times[0] - out.timing.arrival_time
                    self.ttft.observe(ttft)
                    deadline = out.timing.ttft_deadline_s
                    if deadline is not None:
                        self.ttft_slo.labels(**self._labels, met=str(ttft <= deadline).lower()).inc()
                else:
                    gap = times[i] - times[i - 1]
                    self.tbt.observe(gap)
                    self.tbt_slo.labels(**self._labels, met=str(gap <= self._tbt_slo_s).lower()).inc()
        if out.finished:
            self.on_finished(out.finish_reason or "error")
            if out.timing.finished_time is not None and out.finish_reason in ("stop", "length"):
                self.e2e.observe(out.timing.finished_time - out.timing.arrival_time)

    def on_steps(self, steps: list[StepStats]) -> None:
        for st in steps:
            if st.actual_s > 0:
                self.step_time_ratio.observe(st.predicted_s / st.actual_s)
            for n in st.chunk_sizes:
                self.chunk_size.observe(n)

    def on_finished(self, reason: str) -> None:
        self.finished.labels(**self._labels, reason=reason).inc()

    def on_control_rejected(self, port: str, n: int) -> None:
        self.control_rejected.labels(**self._labels, port=port).inc(n)

    def on_stats(self, stats: EngineStats) -> None:
        self.running.labels(**self._labels).set(stats.num_running)
        self.waiting.labels(**self._labels).set(stats.num_waiting)
        for g, used in enumerate(stats.kv_cache_usage):
            self.kv_usage.labels(**self._labels, kvp_group=str(g)).set(used)
        if stats.num_preemptions > self._num_preemptions:
            self.preemptions.inc(stats.num_preemptions - self._num_preemptions)
            self._num_preemptions = stats.num_preemptions
        self.prefix_cache_queries.inc(stats.prefix_cache_queries - self._prefix_cache_queries)
        self._prefix_cache_queries = stats.prefix_cache_queries
        self.prefix_cache_hits.inc(stats.prefix_cache_hits - self._prefix_cache_hits)
        self._prefix_cache_hits = stats.prefix_cache_hits
        self.cached_blocks.set(stats.num_cached_blocks)
        self.lane_chunks.inc(stats.num_lane_chunks - self._num_lane_chunks)
        self._num_lane_chunks = stats.num_lane_chunks
        self.lane_steps_sms.set(stats.lane_steps_sms)

    # ---- HTTP -------------------------------------------------------------------------

    def render(self) -> bytes:
        return generate_latest(self.registry)
