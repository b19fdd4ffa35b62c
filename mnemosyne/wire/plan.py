"""The payloads of driver <-> worker steps: `StepPlan` out, `StepResult` back.

Plain frozen dataclasses that msgspec encodes and, on the receiving side, decodes
and type-checks field by field (see `codec.py`). How plans are built and what the
block-table deltas mean: `engine/step_plan.py`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from mnemosyne.request import TokenLogprobs
from mnemosyne.sampling_params import SamplingParams

# The input token of a decode ahead (async scheduling, one device): the token that the
# previous plan sampled for the same request, still on the device when this plan was built.
# The worker puts it in place on the device (worker/worker.py); it never reaches the model.
UNRESOLVED_TOKEN_ID = -1


@dataclass(frozen=True)
class NewRequest:
    request_id: str
    sampling_params: SamplingParams
    # What the reporting rank's logits processors need beyond the chunks' own token ids
    # (layers/logits_processors.py): set only when sampling_params.needs_history.
    num_prompt_tokens: int = 0
    prompt_token_ids: tuple[int, ...] = ()  # only with a repetition penalty
    min_tokens_banned_ids: tuple[int, ...] = ()  # eos + stop_token_ids, only with min_tokens


@dataclass(frozen=True)
class PiecePlan:
    group: int  # KVP group holding keys [token_start, token_end)
    token_start: int
    token_end: int  # reserved slots end when the plan was built
    num_known_blocks: int  # blocks of this piece the group's workers already mirror
    new_block_ids: tuple[int, ...]  # appended to the mirror


@dataclass(frozen=True)
class ChunkPlan:
    request_id: str
    start: int
    num_tokens: int
    sample: bool
    token_ids: tuple[int, ...]  # tokens [start, end); (UNRESOLVED_TOKEN_ID,) for a decode ahead
    pieces: tuple[PiecePlan, ...]  # oldest first; the last one owns [start, end)
    prompt_logprob_start: int  # positions [start', start' + len(targets)) are scored
    prompt_logprob_targets: tuple[int, ...]  # target of position p is prompt token p + 1

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    @property
    def is_decode_ahead(self) -> bool:
        """Its input token is the previous plan's sample for this request (async scheduling)."""
        return self.token_ids[0] == UNRESOLVED_TOKEN_ID

    @property
    def owner_group(self) -> int:
        return self.pieces[-1].group

    @property
    def is_shared(self) -> bool:
        """True when more than one KVP group holds keys this chunk attends to."""
        return len(self.pieces) > 1


@dataclass(frozen=True)
class StepPlan:
    step_id: int
    chunks: tuple[ChunkPlan, ...]
    new_requests: tuple[NewRequest, ...] = ()
    freed_kv: tuple[str, ...] = ()
    finished: tuple[str, ...] = ()

    @property
    def num_batched_tokens(self) -> int:
        """Query tokens of the step, every group's (as `SchedulerOutput.num_batched_tokens`)."""
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_decode_only(self) -> bool:
        """No prefill chunk: every chunk is one decode token."""
        return all(c.num_tokens == 1 for c in self.chunks)

    @property
    def num_shared_tokens(self) -> int:
        """Query tokens whose attention partials are merged across KVP groups this step."""
        return sum(c.num_tokens for c in self.chunks if c.is_shared)


class StepPath(enum.Enum):
    """How a worker ran its part of a micro-batch."""

    DECODE_GRAPH = "decode_graph"  # a CUDA graph of a whole decode step
    MIXED_GRAPH = "mixed_graph"  # a CUDA graph of a whole step with chunks, attention included
    PIECEWISE = "piecewise"  # CUDA graphs of everything but attention, attention eager
    EAGER = "eager"
    IDLE = "idle"  # no token of the micro-batch on this rank


@dataclass(frozen=True)
class LaneChunkTiming:
    """Where a prefill lane chunk's time went (worker/prefill_lane.py; the step log records
    it). The allocator counts are the device's, over the chunk: the steps' allocations too."""

    launch_s: float  # the lane thread, from starting the chunk's launch to its last launch
    paced_s: float  # of which waiting (the GIL released) for the chunk's earlier layers (`pace`)
    device_s: float  # the lane stream, from when it could start the chunk (the work it waited for done) to its end
    num_device_allocs: int = 0  # cudaMalloc calls of torch's caching allocator
    num_device_frees: int = 0  # cudaFree calls (each synchronizes the device)
    num_alloc_retries: int = 0  # allocations that freed the cache and tried again


@dataclass(frozen=True)
class StepTrace:
    """What ran a micro-batch on a reporting rank (the step log records it)."""

    path: StepPath
    num_cudnn_chunks: int = 0  # chunks of the step on cuDNN (eager attention only)
    chunk_splits: tuple[int, ...] = ()  # key splits of each eager launch of the Triton chunk kernel
    steps_sms: int | None = None  # the SMs it was confined to beside a prefill lane chunk; None: every SM
    lane: LaneChunkTiming | None = None  # a prefill lane chunk's: its timing


@dataclass
class StepResult:
    """Sampled tokens and logprobs of one micro-batch (merged over KVP groups)."""

    step_id: int
    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    # request_id -> (first prompt position p, entries for positions p+1, p+2, ...)
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprobs]]] = field(default_factory=dict)
    trace: StepTrace | None = None  # the first reporting rank's (KVP group 0 when merged in order)

    def update(self, other: StepResult) -> None:
        self.sampled_token_ids.update(other.sampled_token_ids)
        self.logprobs.update(other.logprobs)
        self.prompt_logprobs.update(other.prompt_logprobs)
        if self.trace is None:
            self.trace = other.trace
