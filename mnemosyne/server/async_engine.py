"""`AsyncEngine`: the engine core process as the HTTP handlers see it, streaming into asyncio.

    event loop (HTTP handlers)                 io thread (core_process.py)      engine core process
    ──────────────────────────                 ───────────────────────────      ───────────────────
    add(subs): AddRequests ──────────────────────────────────────────────────>  admit all or none
               await future <──────────────── AddResult: streams registered <──
    async for out in handle <─ call_soon_threadsafe ── StepOutputs: token ids <── one message per step
                                                        -> detokenize, stop strings
                                                        -> cumulative RequestOutput
                                                        stop string: AbortRequests ─────────────>
    handle.close() (client gone): AbortRequests ─────────────────────────────>  applied before next step
    stop(): StopEngine ──────────────────────────────────────────────────────>  abort the rest, exit 0

The engine (scheduler, KV cache, workers) lives in another process, so nothing a
handler does can corrupt it, and HTTP work never takes its GIL. If the core dies
(a worker died or froze, a bug, a kill) every open stream gets `EngineDeadError`,
new requests are refused with 503, and `on_dead` callbacks run (`mnemosyne serve`
then exits non-zero).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import numpy as np

from mnemosyne.engine.args import EngineArgs
from mnemosyne.engine.detokenizer import IncrementalDetokenizer
from mnemosyne.engine.llm_engine import load_tokenizer
from mnemosyne.outputs import EngineStats, RequestOutput, RequestTiming
from mnemosyne.sampling_params import SamplingParams
from mnemosyne.server.core_process import CoreProcess
from mnemosyne.server.errors import APIError, EngineDeadError
from mnemosyne.server.metrics import ServerMetrics
from mnemosyne.wire.engine_core import (
    AbortRequests,
    AddRequests,
    AddResult,
    CheckIntegrity,
    CoreRequest,
    CoreToServer,
    EngineDead,
    IntegrityResult,
    OutputDelta,
    StepOutputs,
    pack_token_ids,
)

logger = logging.getLogger("mnemosyne.server")

_DEAD_CORE_WAIT_S = 5.0  # a core that reported its death may still be stopping its workers


@dataclass(frozen=True)
class SubRequest:
    """One engine request: a prompt of an API call, times `n`."""

    request_id: str
    # A text prompt's ids, or a prompt given as ids as the handler's checked TOKEN_ID_DTYPE
    # array (`ServingContext.check_token_ids`; the `n` sub-requests share it). For the
    # detokenizer, the output and the metrics.
    prompt_token_ids: list[int] | np.ndarray = field(compare=False)
    params: SamplingParams

    def packed_prompt(self) -> bytes:
        """The prompt as `CoreRequest` carries it: a checked array is copied out as it is."""
        return pack_token_ids(self.prompt_token_ids)


class _Stream:
    """Outputs of one API call's sub-requests, delivered on the caller's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()


@dataclass
class _Accumulated:
    """A request's output so far, rebuilt from the core's deltas; detokenized here, where
    stop strings are matched (the engine core sends token ids only)."""

    stream: _Stream
    prompt_token_ids: list[int] | np.ndarray
    detok: IncrementalDetokenizer | None  # None: the model has no tokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    prompt_logprobs: list = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)

    def apply(self, d: OutputDelta) -> RequestOutput:
        """The output after delta `d`. Finished with reason "stop" when a stop string
        appeared (tokens after the one completing it are dropped); the core is still
        running such a request and must be told to abort it."""
        new_ids = list(d.new_token_ids)
        finished, reason, finished_time = d.finished, d.finish_reason, d.finished_time
        delta_text = ""
        if self.detok is not None:
            for i, t in enumerate(new_ids):
                if self.detok.add_token(t) and not finished:
                    new_ids = new_ids[: i + 1]
                    finished, reason, finished_time = True, "stop", time.monotonic()
                    break
            delta_text = self.detok.take_delta(finished)
        self.token_ids += new_ids
        self.logprobs += (d.new_logprobs or [])[: len(new_ids)]
        self.prompt_logprobs += d.new_prompt_logprobs or ()
        self.token_times += d.new_token_times[: len(new_ids)]
        return RequestOutput(
            request_id=d.request_id,
            prompt=None,
            prompt_token_ids=self.prompt_token_ids,
            token_ids=list(self.token_ids),
            text=self.detok.text if self.detok is not None else "",
            finished=finished,
            finish_reason=reason,
            logprobs=list(self.logprobs) if d.new_logprobs is not None else None,
            prompt_logprobs=list(self.prompt_logprobs) if d.new_prompt_logprobs is not None else None,
            timing=RequestTiming(
                d.arrival_time, d.first_token_time, list(self.token_times), finished_time, d.ttft_deadline_s
            ),
            delta_text=delta_text,
            delta_token_ids=new_ids,
            num_preemptions=d.num_preemptions,
            num_computed_tokens=d.num_computed_tokens,
            num_cached_tokens=d.num_cached_tokens,
        )


@dataclass
class _PendingAdd:
    subs: list[SubRequest]
    stream: _Stream
    done: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


class RequestHandle:
    """The outputs of one admitted API call. Iterate until every sub-request has
    finished; `close()` (always call it, e.g. in a finally) aborts the unfinished ones,
    which frees their KV blocks."""

    def __init__(self, engine: AsyncEngine, stream: _Stream, request_ids: list[str]) -> None:
        self._engine = engine
        self._stream = stream
        self._unfinished = set(request_ids)

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        while self._unfinished:
            item = await self._stream.queue.get()
            if isinstance(item, BaseException):
                self._unfinished.clear()  # the engine dropped them already
                raise item
            if item.finished:
                self._unfinished.discard(item.request_id)
            yield item

    def close(self) -> None:
        if self._unfinished:
            self._engine.abort(sorted(self._unfinished))
            self._unfinished.clear()


class AsyncEngine:
    """Starts the engine core process (blocks until its model is loaded)."""

    def __init__(
        self, engine_args: EngineArgs, model_name: str | None, max_waiting_requests: int = 1024
    ) -> None:
        self.core = CoreProcess(engine_args, max_waiting_requests, model_name or str(engine_args.model))
        self.info = self.core.info
        self._tokenizer = load_tokenizer(
            self.info.model_dir
        )  # the io thread's own (HF's are not thread-safe)
        self.metrics = ServerMetrics(
            model_name or self.info.model_dir, self.info.num_kvp_groups, self.info.tbt_slo_s
        )
        self._lock = threading.Lock()  # guards the tables below (event loop + io thread)
        self._requests: dict[str, _Accumulated] = {}
        self._adds: dict[int, _PendingAdd] = {}
        self._checks: dict[int, concurrent.futures.Future] = {}
        self._call_ids = itertools.count()
        self._dead: str | None = None
        self._stopped = False
        self._failed = False
        self._on_dead: list[Callable[[str], None]] = []
        self._stats = EngineStats(0, 0, 0, (0.0,) * self.info.num_kvp_groups)
        self._num_rejected = {"engine": 0, "workers": 0}
        self.core.start(self._on_message, self._die)

    # ---- event loop side --------------------------------------------------------------

    @property
    def is_alive(self) -> bool:
        return self._dead is None

    @property
    def dead_reason(self) -> str | None:
        return self._dead

    @property
    def failed(self) -> bool:
        """True when the engine died (not stopped on request)."""
        return self._failed

    @property
    def stats(self) -> EngineStats:
        """The snapshot sent after the latest step."""
        return self._stats

    def on_dead(self, callback: Callable[[str], None]) -> None:
        """Call `callback(reason)` (from the io thread) when the engine core dies."""
        self._on_dead.append(callback)

    async def add(self, subs: list[SubRequest]) -> RequestHandle:
        """Admit every sub-request or none: raises an `APIError` (400 invalid, 400 context
        length, 503 queue full or engine down) and leaves the engine untouched."""
        pending = _PendingAdd(subs, _Stream(asyncio.get_running_loop()))
        call_id = next(self._call_ids)
        with self._lock:
            if self._dead is not None:
                raise EngineDeadError(self._dead)
            self._adds[call_id] = pending
        reqs = [CoreRequest(s.request_id, s.packed_prompt(), s.params) for s in subs]
        self.core.send(AddRequests(call_id, reqs))
        try:
            await asyncio.wrap_future(pending.done)
        except asyncio.CancelledError:  # it may have been admitted all the same
            self.abort([s.request_id for s in subs])
            raise
        return RequestHandle(self, pending.stream, [s.request_id for s in subs])

    def abort(self, request_ids: list[str]) -> None:
        """Abort these requests (unknown or finished ids are ignored)."""
        with self._lock:
            known = [rid for rid in request_ids if self._requests.pop(rid, None) is not None]
            dead = self._dead is not None
        for _ in known:
            self.metrics.on_finished("abort")
        if request_ids and not dead:
            self.core.send(AbortRequests(list(request_ids)))

    def check_integrity(self, timeout_s: float = 60.0) -> list[float]:
        """Check the KV cache in the core between steps (raises on a broken invariant);
        returns the per-group usage. Blocking: not for the event loop."""
        call_id = next(self._call_ids)
        done: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._dead is not None:
                raise EngineDeadError(self._dead)
            self._checks[call_id] = done
        self.core.send(CheckIntegrity(call_id))
        return done.result(timeout_s)

    @property
    def num_rejected_messages(self) -> dict[str, int]:
        """Control messages dropped so far: on this server's port and the core's worker port."""
        return {"engine": self.core.codec.num_rejected, "workers": self._num_rejected["workers"]}

    def stop(self, timeout_s: float = 60.0) -> None:
        """Abort what is left, stop the core and its workers. Idempotent."""
        with self._lock:
            self._stopped = True
            dead = self._dead is not None
        self.core.stop(_DEAD_CORE_WAIT_S if dead else timeout_s)  # a dead core gets no drain time
        self._die("the server is shutting down")

    # ---- io thread ---------------------------------------------------------------------

    def _on_message(self, msg: CoreToServer) -> None:
        if isinstance(msg, StepOutputs):
            self._deliver(msg)
        elif isinstance(msg, AddResult):
            self._added(msg)
        elif isinstance(msg, IntegrityResult):
            with self._lock:
                done = self._checks.pop(msg.call_id, None)
            if done is not None:
                if msg.error is None:
                    done.set_result(msg.kv_cache_usage)
                else:
                    done.set_exception(AssertionError(msg.error))
        elif isinstance(msg, EngineDead):
            self._die(msg.reason)
        else:
            logger.warning("ignored %s from the engine core", type(msg).__name__)

    def _added(self, msg: AddResult) -> None:
        with self._lock:
            pending = self._adds.pop(msg.call_id, None)
            if pending is not None and msg.error is None:
                for s in pending.subs:
                    detok = None
                    if self._tokenizer is not None:
                        p = s.params
                        detok = IncrementalDetokenizer.for_prompt(
                            self._tokenizer, s.prompt_token_ids, p.skip_special_tokens, p.stop
                        )
                    self._requests[s.request_id] = _Accumulated(pending.stream, s.prompt_token_ids, detok)
        if pending is None:
            return
        if msg.error is not None:
            e = msg.error
            self.metrics.on_rejected(e.code or e.type)
            pending.done.set_exception(APIError(e.status, e.message, e.type, e.param, e.code))
            return
        for s in pending.subs:
            self.metrics.on_admitted(len(s.prompt_token_ids))
        if pending.done.set_running_or_notify_cancel():
            pending.done.set_result(None)

    def _deliver(self, msg: StepOutputs) -> None:
        with self._lock:
            live = [(acc, d) for d in msg.outputs if (acc := self._requests.get(d.request_id)) is not None]
        outputs = [(acc.stream, acc.apply(d)) for acc, d in live]  # detokenize outside the lock
        stopped: list[str] = []  # by a stop string here: the core still runs them
        with self._lock:
            for (_, out), (_, d) in zip(outputs, live, strict=True):
                if out.finished and self._requests.pop(out.request_id, None) is not None and not d.finished:
                    stopped.append(out.request_id)
        if stopped:
            self.core.send(AbortRequests(stopped))
        for _, out in outputs:
            self.metrics.on_output(out)
        self._stats = msg.stats
        self.metrics.on_stats(msg.stats)
        self.metrics.on_steps(msg.step_stats)
        self._count_rejected("workers", msg.num_rejected_worker_messages)
        self._count_rejected("engine", self.core.codec.num_rejected)
        _post(list(outputs))

    def _count_rejected(self, port: str, total: int) -> None:
        if total > self._num_rejected[port]:
            self.metrics.on_control_rejected(port, total - self._num_rejected[port])
            self._num_rejected[port] = total

    def _die(self, reason: str) -> None:
        """Fail every open request and refuse new ones (idempotent)."""
        with self._lock:
            if self._dead is not None:
                return
            self._dead = reason
            streams = [acc.stream for acc in self._requests.values()]
            self._requests.clear()
            futures = [p.done for p in self._adds.values()] + list(self._checks.values())
            self._adds.clear()
            self._checks.clear()
            stopped = self._stopped
            self._failed = not stopped
        err = EngineDeadError(reason)
        if not stopped:
            logger.error("the engine died: %s", reason)
        for _ in streams:
            self.metrics.on_finished("error")
        for f in futures:
            if not f.done():
                f.set_exception(err)
        _post([(s, err) for s in dict.fromkeys(streams)])
        if not stopped:
            for cb in self._on_dead:
                cb(reason)


def _post(items: list[tuple[_Stream, RequestOutput | BaseException]]) -> None:
    """Hand items to their streams: one thread-safe callback per event loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, RequestOutput | BaseException]]] = {}
    for stream, item in items:
        by_loop.setdefault(stream.loop, []).append((stream, item))
    for loop, group in by_loop.items():

        def put_all(group: list[tuple[_Stream, RequestOutput | BaseException]] = group) -> None:
            for stream, item in group:
                stream.queue.put_nowait(item)

        try:
            loop.call_soon_threadsafe(put_all)
        except RuntimeError:  # the caller's loop is closed: nobody is listening any more
            pass
