"""`AsyncEngine`: the `LLMEngine` on its own thread, streaming outputs into asyncio.

    event loop (HTTP handlers)                     engine thread (owns LLMEngine)
    ──────────────────────────                     ──────────────────────────────
    add(subs):    _Add(subs, future) ───────────>  drain commands between steps:
                  await future <─────────────────    admit all subs or none (400 / 503)
    async for out in handle <── call_soon_threadsafe ── step() -> outputs, metrics
    handle.close() before the end (client gone):
                  _Abort(ids) ───────────────────>   engine.abort(id): KV blocks freed
    stop(): _Stop ───────────────────────────────>   abort the rest, engine.shutdown()

Only the engine thread touches the engine, the scheduler and the KV cache; the loop
only sends commands and reads its streams, so a bad request can never corrupt
another one. If a step raises (a worker died), every stream gets `EngineDeadError`
and new requests are refused with 503.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from mnemosyne.engine.llm_engine import LLMEngine
from mnemosyne.outputs import EngineStats, RequestOutput
from mnemosyne.sampling_params import SamplingParams
from mnemosyne.server.errors import EngineDeadError, ServerOverloadedError, to_api_error
from mnemosyne.server.metrics import ServerMetrics
from mnemosyne.server.prefill_progress import PrefillProgressLog

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SubRequest:
    """One engine request: a prompt of an API call, times `n`."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


class _Stream:
    """Outputs of one API call's sub-requests, delivered on the caller's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()


@dataclass
class _Add:
    subs: list[SubRequest]
    stream: _Stream
    done: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


@dataclass
class _Abort:
    request_ids: list[str]


@dataclass
class _Call:
    fn: Callable[[LLMEngine], Any]
    done: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


class _Stop:
    pass


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
    def __init__(self, engine: LLMEngine, metrics: ServerMetrics, max_waiting_requests: int = 1024) -> None:
        self.engine = engine
        self.metrics = metrics
        self.max_waiting_requests = max_waiting_requests
        self._commands: queue.SimpleQueue[_Add | _Abort | _Call | _Stop] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}  # engine thread only
        self._dead: str | None = None
        self._stats = engine.stats()
        self._progress = PrefillProgressLog(engine.predicted_remaining_prefill_s)
        self._thread = threading.Thread(target=self._run, name="mnemosyne-engine", daemon=True)
        self._thread.start()

    # ---- event loop side --------------------------------------------------------------

    @property
    def is_alive(self) -> bool:
        return self._dead is None and self._thread.is_alive()

    @property
    def dead_reason(self) -> str | None:
        return self._dead if self._dead is not None or self._thread.is_alive() else "engine thread exited"

    @property
    def stats(self) -> EngineStats:
        """The snapshot taken after the latest step."""
        return self._stats

    async def add(self, subs: list[SubRequest]) -> RequestHandle:
        """Admit every sub-request or none: raises an `APIError` (400 invalid, 400 context
        length, 503 queue full or engine down) and leaves the engine untouched."""
        if not self.is_alive:
            raise EngineDeadError(self.dead_reason or "stopped")
        stream = _Stream(asyncio.get_running_loop())
        add = _Add(subs, stream)
        self._send(add)
        try:
            await asyncio.wrap_future(add.done)
        except asyncio.CancelledError:  # it may have been admitted all the same
            self.abort([s.request_id for s in subs])
            raise
        return RequestHandle(self, stream, [s.request_id for s in subs])

    def abort(self, request_ids: list[str]) -> None:
        """Abort these requests (unknown or finished ids are ignored)."""
        self._send(_Abort(list(request_ids)))

    def call(self, fn: Callable[[LLMEngine], Any], timeout_s: float = 60.0) -> Any:
        """Run `fn(engine)` on the engine thread between steps (e.g. a KV integrity check)
        and return its result. Blocking: not for the event loop."""
        cmd = _Call(fn)
        self._send(cmd)
        return cmd.done.result(timeout_s)

    def stop(self, timeout_s: float = 60.0) -> None:
        """Abort what is left, stop the engine thread and the workers. Idempotent."""
        if self._thread.is_alive():
            self._send(_Stop())
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                logger.error("engine thread did not stop within %.0f s", timeout_s)

    def _send(self, cmd: _Add | _Abort | _Call | _Stop) -> None:
        self._commands.put(cmd)
        self._wake.set()

    # ---- engine thread ----------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                if not engine.has_unfinished_requests() and self._commands.empty():
                    self._wake.wait(timeout=1.0)
                self._wake.clear()
                if not self._drain_commands():
                    break
                if engine.has_unfinished_requests():
                    self._deliver(engine.step())
                self._refresh_stats()
        except BaseException as e:  # a worker died or a bug: fail every request, refuse new ones
            logger.exception("engine loop failed")
            self._dead = f"{type(e).__name__}: {e}"
            self._fail_all(EngineDeadError(self._dead))
        finally:
            self._shutdown_engine()

    def _drain_commands(self) -> bool:
        """Apply pending commands; False once asked to stop."""
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return True
            if isinstance(cmd, _Add):
                self._admit(cmd)
            elif isinstance(cmd, _Abort):
                for rid in cmd.request_ids:
                    self._abort(rid)
            elif isinstance(cmd, _Call):
                try:
                    cmd.done.set_result(cmd.fn(self.engine))
                except Exception as e:
                    cmd.done.set_exception(e)
            else:
                self._dead = "the server is shutting down"
                self._fail_all(EngineDeadError(self._dead))
                return False

    def _admit(self, cmd: _Add) -> None:
        if not cmd.done.set_running_or_notify_cancel():
            return  # the caller went away before admission
        engine = self.engine
        num_waiting = engine.scheduler.num_waiting
        if num_waiting + len(cmd.subs) > self.max_waiting_requests:
            self.metrics.on_rejected("queue_full")
            cmd.done.set_exception(ServerOverloadedError(num_waiting, self.max_waiting_requests))
            return
        added: list[str] = []
        try:
            for sub in cmd.subs:
                engine.add_request(sub.prompt_token_ids, sub.params, request_id=sub.request_id)
                added.append(sub.request_id)
        except Exception as e:
            for rid in added:
                engine.abort(rid)
            err = to_api_error(e)
            self.metrics.on_rejected(err.code or err.type)
            cmd.done.set_exception(err)
            return
        for sub in cmd.subs:
            self._streams[sub.request_id] = cmd.stream
            self.metrics.on_admitted(len(sub.prompt_token_ids))
        cmd.done.set_result(None)

    def _abort(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is not None:
            self.engine.abort(request_id)
            self.metrics.on_finished("abort")

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        items: list[tuple[_Stream, RequestOutput | BaseException]] = []
        for out in outputs:
            self.metrics.on_output(out)
            self._progress.on_output(out)
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue  # aborted by the client while this step ran
            if out.finished:
                del self._streams[out.request_id]
            items.append((stream, out))
        _post(items)

    def _fail_all(self, err: BaseException) -> None:
        items: list[tuple[_Stream, RequestOutput | BaseException]] = []
        for rid, stream in list(self._streams.items()):
            self.metrics.on_finished("error")
            try:
                self.engine.abort(rid)
            except Exception:  # the engine may be broken; the request is dropped either way
                pass
            items.append((stream, err))
        self._streams.clear()
        while True:  # admissions that raced the failure
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
            if isinstance(cmd, _Add | _Call) and cmd.done.set_running_or_notify_cancel():
                cmd.done.set_exception(err)
        _post(items)

    def _refresh_stats(self) -> None:
        self._stats = self.engine.stats()
        self.metrics.on_stats(self._stats)
        self.metrics.on_steps(self.engine.take_step_stats())

    def _shutdown_engine(self) -> None:
        try:
            self.engine.shutdown()
        except Exception:
            logger.exception("engine shutdown failed")


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
