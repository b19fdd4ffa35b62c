"""What the engine returns for each request, after every step that touched it."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mnemosyne.request import TokenLogprobs


@dataclass
class RequestTiming:
    arrival_time: float
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)  # one per output token
    finished_time: float | None = None
    ttft_deadline_s: float | None = None  # the TTFT SLO of this request (LARS deadline)

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    # The engine's: its request's read-only int32 array (a multi-million-token prompt is never
    # copied into a list, not per step, not once); the API server's: the list it tokenized.
    prompt_token_ids: list[int] | np.ndarray
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None  # "stop", "length", "abort" or None while running
    logprobs: list[TokenLogprobs] | None
    prompt_logprobs: list[TokenLogprobs | None] | None
    timing: RequestTiming
    # What this step added, for streaming callers.
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    num_preemptions: int = 0
    num_computed_tokens: int = 0  # prefill progress: tokens whose KV is in the cache
    num_cached_tokens: int = 0  # prompt tokens whose KV was taken from the prefix cache


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load, for metrics and admission control."""

    num_running: int
    num_waiting: int
    num_preemptions: int  # since the engine started
    kv_cache_usage: tuple[float, ...]  # fraction of blocks in use, per KVP group (cached but free: free)
    prefix_cache_queries: int = 0  # tokens of admitted requests looked up in the prefix cache, since start
    prefix_cache_hits: int = 0  # of those, tokens found cached
    num_cached_blocks: int = 0  # blocks holding reusable prefix KV now, every group
    num_lane_chunks: int = 0  # prefill lane chunks scheduled since start (engine/prefill_lane.py)
    lane_steps_sms: int = 0  # SMs the steps are confined to beside the running lane chunk; 0: every SM


@dataclass(frozen=True)
class StepStats:
    """One processed micro-batch: its predicted and measured time, and its prefill chunk sizes."""

    predicted_s: float
    # submit to result (with a pipeline, including waits behind earlier micro-batches; with async
    # scheduling from the later of its submit and the previous step's result)
    actual_s: float
    chunk_sizes: tuple[int, ...]  # tokens of each prefill chunk (decodes excluded)
