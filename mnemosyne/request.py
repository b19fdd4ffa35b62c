"""Request state shared by the scheduler, the engine and the output processor.

Token bookkeeping of one request (positions are global token indices)::

    a request's tokens: prompt_token_ids, then output_token_ids
    |<------------------ num_tokens ------------------>|
    [ p0 p1 ... p(P-1) | o0 o1 ... o(k-1) ]
    |<-- num_computed_tokens -->|                         KV written for these
    |<----- num_dispatched_tokens ----->|                 sent into the pipeline

    invariant: num_computed_tokens <= num_dispatched_tokens <= num_tokens + 1

A step schedules tokens [num_dispatched_tokens, num_dispatched_tokens + n). When
the tokens up to num_tokens have all been computed, the last position's logits
sample the next output token. A decode is simply n == 1. Without a pipeline or
async scheduling, dispatched == computed between steps; sequence pipeline
parallelism lets dispatched run ahead. Async scheduling (one device) may dispatch
one token more than is known, a decode ahead::

    [ p0 ... | o0 ... o(k-1) | ? ]      ? = o(k), sampled by a chunk still in flight
                              ^ num_tokens
    num_dispatched_tokens == num_tokens + 1: the decode of position num_tokens runs
    with its input token taken on the device from the in-flight chunk's sample.

Preemption by recompute resets both counters to 0 and keeps output_token_ids,
which are recomputed as part of the "prompt". A prefix-cache hit of h tokens (a
multiple of the block size) starts both counters at h instead of 0.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import numpy as np

from mnemosyne.errors import ContextLengthError, InvalidRequestError
from mnemosyne.sampling_params import SamplingParams

TOKEN_ID_DTYPE = np.dtype("<i4")  # a held prompt's ids, and CoreRequest's packed form


def check_token_ids(
    token_ids: list[int] | np.ndarray, vocab_size: int, what: str = "prompt token ids"
) -> np.ndarray:
    """The ids as a read-only 1-D TOKEN_ID_DTYPE array; InvalidRequestError unless every one
    is an integer in [0, vocab_size). In numpy, not a Python loop: a prompt may hold millions
    of ids (351K: 13.6 ms per loop, 3.8 ms here, on a 2-core CPU), and the engine core checks
    every arriving prompt between two steps. A read-only array of that dtype (the core's
    unpacked wire frame) is returned as it is; anything else is copied, so a caller's later
    writes never reach a request."""
    error = InvalidRequestError(f"{what} must be integers in [0, {vocab_size})")
    try:
        ids = np.asarray(token_ids)  # ints -> an integer dtype; floats, bools, strings, huge ints do not
    except (ValueError, TypeError) as e:  # ragged nesting
        raise error from e
    if ids.size == 0:
        return prompt_array(np.empty(0, dtype=TOKEN_ID_DTYPE))
    if ids.ndim != 1 or ids.dtype.kind not in "iu" or ids.min() < 0 or ids.max() >= vocab_size:
        raise error
    return prompt_array(ids)  # vocab_size < 2**31: the ids fit


def prompt_array(token_ids: list[int] | np.ndarray) -> np.ndarray:
    """Ids already checked against the vocabulary as a read-only TOKEN_ID_DTYPE array: the
    array itself when it is one, else a copy (a caller's later writes never reach it)."""
    if (
        isinstance(token_ids, np.ndarray)
        and token_ids.dtype == TOKEN_ID_DTYPE
        and not token_ids.flags.writeable
    ):
        return token_ids
    ids = np.array(token_ids, dtype=TOKEN_ID_DTYPE)
    ids.flags.writeable = False
    return ids


# One position's log-probabilities: {token_id: logprob}; holds the chosen token plus the top-k.
TokenLogprobs = dict[int, float]


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()

    @property
    def finished(self) -> bool:
        return self in _FINISHED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASON.get(self)


_FINISHED = {
    RequestStatus.FINISHED_STOPPED,
    RequestStatus.FINISHED_LENGTH,
    RequestStatus.FINISHED_ABORTED,
}
_FINISH_REASON = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


@dataclass
class Request:
    request_id: str
    # [num_prompt_tokens] TOKEN_ID_DTYPE, read-only (a list is converted): a prompt of
    # millions of ids is held without a Python int per id, and never copied into a list
    prompt_token_ids: np.ndarray
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    arrival_time: float = field(default_factory=time.monotonic)

    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    num_dispatched_tokens: int = 0
    num_preemptions: int = 0
    # Prompt positions whose prompt logprobs were already produced (not redone after preemption).
    num_prompt_logprobs_done: int = 0
    # Prefix cache: hashes of the full blocks of prompt + outputs (grown as tokens come), and the
    # tokens taken from the cache when first admitted (None until then).
    block_hashes: list[bytes] = field(default_factory=list)
    num_cached_tokens: int | None = None

    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.prompt_token_ids = prompt_array(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_pending_tokens(self) -> int:
        """Known tokens not yet dispatched into the model (0 during a decode ahead)."""
        return max(0, self.num_tokens - self.num_dispatched_tokens)

    @property
    def is_prefill(self) -> bool:
        """True while more than the newest token still needs computing."""
        return self.num_tokens - self.num_computed_tokens > 1

    def token_id_at(self, pos: int) -> int:
        p = self.num_prompt_tokens
        return int(self.prompt_token_ids[pos]) if pos < p else self.output_token_ids[pos - p]

    def token_ids_in(self, start: int, end: int) -> tuple[int, ...]:
        """The ids of positions [start, end) of prompt + outputs, as plain ints."""
        p = self.num_prompt_tokens
        prompt = self.prompt_token_ids[start:end].tolist() if start < p else []
        return (*prompt, *self.output_token_ids[max(start - p, 0) : max(end - p, 0)])

    def check_servable(self, max_model_len: int, capacity_tokens: int) -> None:
        """Raise InvalidRequestError / ContextLengthError if this request can never be served:
        an empty prompt, or prompt + max_tokens over max_model_len or over what the KV cache
        holds for one request (`capacity_tokens`)."""
        p, m = self.num_prompt_tokens, self.sampling_params.max_tokens
        if p == 0:
            raise InvalidRequestError(f"request {self.request_id!r}: prompt is empty (0 tokens, need >= 1)")
        total = p + m
        limits = {"max_model_len": max_model_len, "the KV cache capacity for one request": capacity_tokens}
        for what, limit in limits.items():
            if total > limit:
                raise ContextLengthError(
                    f"request {self.request_id!r}: prompt ({p} tokens) + max_tokens ({m}) = {total} "
                    f"exceeds {what} ({limit} tokens)"
                )

    def stop_status(self, token: int, max_model_len: int) -> RequestStatus | None:
        """How the request ends with `token` just appended (eos unless ignored, a stop id,
        max_tokens, max_model_len), or None if it goes on. Stop strings are the detokenizer's."""
        sp = self.sampling_params
        if (token in self.eos_token_ids and not sp.ignore_eos) or token in sp.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if self.num_output_tokens >= sp.max_tokens or self.num_tokens >= max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
