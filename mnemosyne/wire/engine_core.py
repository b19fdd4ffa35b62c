"""Messages between the API server process and the engine core process.

    API server (HTTP, tokenizer)                          engine core (scheduler, KV, executor)
      │ <──────────────────────────────── CoreHello(pid) ── │  connected
      │ ── StartEngine(engine args) ──────────────────────> │  build the engine, start workers
      │ <───────────────────────────── CoreReady(info) ──── │  (or EngineDead(reason), then exit 1)
      │ ── AddRequests(call_id, requests) ────────────────> │  admit all or none
      │ <────────────────────── AddResult(call_id, error) ─ │
      │ ── AbortRequests(ids) ────────────────────────────> │  applied before the next step
      │                                                      │  (client gone, or a stop string matched)
      │ <────────── StepOutputs(deltas of one step, stats) ─ │  one message per step
      │ ── CheckIntegrity(call_id) ───────────────────────> │  KV cache check (tests, debugging)
      │ <────────────── IntegrityResult(call_id, error) ──── │
      │ ── StopEngine() ──────────────────────────────────> │  abort all, stop workers, exit 0
      │ <───────────────────────────── EngineDead(reason) ─ │  a worker died / a bug: exit 1
      heartbeat thread "engine-core-hb" ── Heartbeat ─────> │  every second (wire/heartbeat.py)

Outputs travel as deltas of token ids (new tokens, logprobs since the last message);
the server detokenizes, applies stop strings (aborting a request that hit one) and
rebuilds the cumulative `RequestOutput` its handlers read.
"""

from __future__ import annotations

import msgspec
import numpy as np

from mnemosyne.outputs import EngineStats, StepStats
from mnemosyne.request import TOKEN_ID_DTYPE, TokenLogprobs
from mnemosyne.sampling_params import SamplingParams
from mnemosyne.wire.heartbeat import Heartbeat

ArgValue = str | int | float | bool | None


class CoreRequest(msgspec.Struct, frozen=True):
    request_id: str
    prompt_token_ids: bytes  # int32 little-endian (`pack_token_ids`): a 500K-token prompt's
    # frame is checked and decoded in 1.1 ms, against 14 ms as a list of ints, between two of
    # the core's steps (benchmarks/probes/core_arrival_cost.py, CPU)
    params: SamplingParams


def pack_token_ids(token_ids: list[int] | np.ndarray) -> bytes:
    """Ids (already checked against the vocabulary) as CoreRequest carries them. A contiguous
    TOKEN_ID_DTYPE array (the server's checked prompt) is copied out as it is; a list is
    converted first (about 5 ms for 351K ids on a 2-core CPU)."""
    return np.asarray(token_ids, dtype=TOKEN_ID_DTYPE).tobytes()


def unpack_token_ids(raw: bytes) -> np.ndarray:
    """CoreRequest's ids as a 1-D int32 array; ValueError if the length is not whole ids."""
    if len(raw) % TOKEN_ID_DTYPE.itemsize:
        raise ValueError(f"packed token ids of {len(raw)} bytes: not a multiple of {TOKEN_ID_DTYPE.itemsize}")
    return np.frombuffer(raw, dtype=TOKEN_ID_DTYPE)


class StartEngine(msgspec.Struct, tag="start", frozen=True):
    engine_args: dict[str, ArgValue]  # EngineArgs fields; dtypes and enums as their names
    max_waiting_requests: int
    model_name: str  # the served model name, for the start-up summary


class AddRequests(msgspec.Struct, tag="add", frozen=True):
    call_id: int
    requests: list[CoreRequest]


class AbortRequests(msgspec.Struct, tag="abort", frozen=True):
    request_ids: list[str]


class CheckIntegrity(msgspec.Struct, tag="check", frozen=True):
    call_id: int


class StopEngine(msgspec.Struct, tag="stop", frozen=True):
    pass


ServerToCore = StartEngine | AddRequests | AbortRequests | CheckIntegrity | StopEngine


class EngineInfo(msgspec.Struct, frozen=True):
    model_dir: str
    max_model_len: int
    max_request_tokens: int  # min(max_model_len, KV capacity of one request)
    vocab_size: int
    num_kvp_groups: int
    tbt_slo_s: float  # the TBT target of adaptive chunking, for the SLO metrics
    summary: list[tuple[str, str]]  # the start-up summary (engine/summary.py), logged by the server


class RequestError(msgspec.Struct, frozen=True):
    """An admission error, as the HTTP error it becomes (`server/errors.APIError`)."""

    status: int
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OutputDelta(msgspec.Struct, frozen=True):
    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    new_logprobs: list[TokenLogprobs] | None  # None: logprobs not requested
    new_prompt_logprobs: list[TokenLogprobs | None] | None
    arrival_time: float  # time.monotonic() (one clock for every process of the host)
    first_token_time: float | None
    new_token_times: list[float]
    finished_time: float | None
    num_preemptions: int
    num_computed_tokens: int
    num_cached_tokens: int  # prompt tokens taken from the prefix cache
    ttft_deadline_s: float | None  # the request's LARS TTFT deadline


class CoreHello(msgspec.Struct, tag="hello", frozen=True):
    pid: int


class CoreReady(msgspec.Struct, tag="ready", frozen=True):
    info: EngineInfo


class AddResult(msgspec.Struct, tag="added", frozen=True):
    call_id: int
    error: RequestError | None


class StepOutputs(msgspec.Struct, tag="outputs", frozen=True):
    outputs: list[OutputDelta]
    stats: EngineStats
    step_stats: list[StepStats]  # the micro-batches processed since the last message
    num_rejected_worker_messages: int  # dropped on the driver's worker port since start


class IntegrityResult(msgspec.Struct, tag="checked", frozen=True):
    call_id: int
    error: str | None
    kv_cache_usage: list[float]


class EngineDead(msgspec.Struct, tag="dead", frozen=True):
    reason: str


CoreToServer = CoreHello | CoreReady | AddResult | StepOutputs | IntegrityResult | EngineDead | Heartbeat

CORE_IDENTITY = b"engine-core"
CORE_SENDER = "engine-core"  # heartbeat sender name (identity b"engine-core-hb")
