"""The engine core process of `mnemosyne serve`: `python -m mnemosyne.engine.core`.

The API server starts it (fresh interpreter, control secret and parent pid given),
and it runs the `LLMEngine` (scheduler, KV manager, executor and its workers)
alone in its process, so HTTP, tokenization, detokenization and JSON never share
its GIL (outputs are token ids; the server detokenizes and applies stop strings,
aborting a request here when one matches)::

    loop:
        drain every queued message (adds, aborts: applied before the next schedule)
        has work ?  step() -> one StepOutputs message (deltas of every request touched,
                              stats, the step's predicted / measured time and chunk sizes);
                              a progress log line while a long prompt prefills
                 :  wait up to 1 s for a message; check the workers' health
        stats changed ?  StepOutputs([], stats, [])
        no message waiting ?  the KV pools' integrity check, once per idle period (after the
                              outputs went out: it takes up to tens of ms)

Any exception from the engine (a worker died or froze, a bug) is sent as
`EngineDead(reason)`, the workers are stopped and the process exits 1. It also
exits when the server is gone (parent watch in its heartbeat thread). SIGINT is
ignored: the server stops it with `StopEngine` after draining HTTP requests.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from http import HTTPStatus

import zmq

from mnemosyne.engine.args import EngineArgs
from mnemosyne.engine.llm_engine import LLMEngine, load_tokenizer
from mnemosyne.engine.prefill_progress import PrefillProgressLog
from mnemosyne.engine.summary import engine_summary
from mnemosyne.errors import ContextLengthError, InvalidRequestError
from mnemosyne.gc_heap import prepare_to_serve
from mnemosyne.outputs import EngineStats, RequestOutput
from mnemosyne.wire.auth import take_core_secret
from mnemosyne.wire.codec import MAX_FRAME_BYTES, Codec
from mnemosyne.wire.engine_core import (
    CORE_IDENTITY,
    CORE_SENDER,
    AbortRequests,
    AddRequests,
    AddResult,
    CheckIntegrity,
    CoreHello,
    CoreReady,
    EngineDead,
    EngineInfo,
    IntegrityResult,
    OutputDelta,
    RequestError,
    ServerToCore,
    StartEngine,
    StepOutputs,
    StopEngine,
    unpack_token_ids,
)
from mnemosyne.wire.heartbeat import Heartbeater

logger = logging.getLogger("mnemosyne.engine.core")

_IDLE_WAIT_MS = 1000


def request_error(exc: Exception) -> RequestError:
    """An admission failure as the HTTP error the server answers with."""
    if isinstance(exc, ContextLengthError):
        return RequestError(
            HTTPStatus.BAD_REQUEST, str(exc), "invalid_request_error", code="context_length_exceeded"
        )
    if isinstance(exc, InvalidRequestError):
        return RequestError(HTTPStatus.BAD_REQUEST, str(exc), "invalid_request_error")
    return RequestError(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {exc!r}", "internal_error")


@dataclass
class _Sent:
    """Per request: how much of the cumulative lists already went out."""

    num_logprobs: int = 0
    num_prompt_logprobs: int = 0
    num_token_times: int = 0


@dataclass
class EngineCore:
    """The message handling of the core, socket-free (tests drive it directly)."""

    engine: LLMEngine
    max_waiting_requests: int
    _sent: dict[str, _Sent] = field(default_factory=dict)
    stopped: bool = False
    progress: PrefillProgressLog = field(init=False)  # a log line while a long prompt prefills

    def __post_init__(self) -> None:
        self.progress = PrefillProgressLog(self.engine.predicted_remaining_prefill_s)

    def handle(self, msg: ServerToCore) -> AddResult | IntegrityResult | None:
        """Apply one message; the reply to send, if any."""
        if isinstance(msg, AddRequests):
            return AddResult(msg.call_id, self._admit(msg))
        if isinstance(msg, AbortRequests):
            for rid in msg.request_ids:
                self.engine.abort(rid)
                self._sent.pop(rid, None)
            return None
        if isinstance(msg, CheckIntegrity):
            try:
                self.engine.kv_manager.check_integrity()
                error = None
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
            return IntegrityResult(msg.call_id, error, list(self.engine.kv_manager.usage()))
        if isinstance(msg, StopEngine):
            self.stopped = True
            return None
        logger.warning("ignored %s after start-up", type(msg).__name__)
        return None

    def _admit(self, msg: AddRequests) -> RequestError | None:
        engine = self.engine
        num_waiting = engine.scheduler.num_waiting
        if num_waiting + len(msg.requests) > self.max_waiting_requests:
            return RequestError(
                HTTPStatus.SERVICE_UNAVAILABLE,
                f"server overloaded: {num_waiting} requests are waiting (limit --max-waiting-requests "
                f"{self.max_waiting_requests}); retry later",
                "server_overloaded",
                code="queue_full",
            )
        added: list[str] = []
        try:
            for r in msg.requests:
                engine.add_request(unpack_token_ids(r.prompt_token_ids), r.params, request_id=r.request_id)
                added.append(r.request_id)
        except Exception as e:
            for rid in added:
                engine.abort(rid)
            return request_error(e)
        for rid in added:
            self._sent[rid] = _Sent()
        return None

    def step(self) -> list[OutputDelta]:
        outputs = self.engine.step()
        for out in outputs:
            self.progress.on_output(out)
        return [self._delta(out) for out in outputs if out.request_id in self._sent]

    def _delta(self, out: RequestOutput) -> OutputDelta:
        sent = self._sent[out.request_id]
        new_lp = None if out.logprobs is None else out.logprobs[sent.num_logprobs :]
        new_plp = None if out.prompt_logprobs is None else out.prompt_logprobs[sent.num_prompt_logprobs :]
        times = out.timing.token_times[sent.num_token_times :]
        sent.num_logprobs += len(new_lp or ())
        sent.num_prompt_logprobs += len(new_plp or ())
        sent.num_token_times += len(times)
        if out.finished:
            del self._sent[out.request_id]
        return OutputDelta(
            request_id=out.request_id,
            new_token_ids=list(out.delta_token_ids),
            finished=out.finished,
            finish_reason=out.finish_reason,
            new_logprobs=new_lp,
            new_prompt_logprobs=new_plp,
            arrival_time=out.timing.arrival_time,
            first_token_time=out.timing.first_token_time,
            new_token_times=times,
            finished_time=out.timing.finished_time,
            num_preemptions=out.num_preemptions,
            num_computed_tokens=out.num_computed_tokens,
            num_cached_tokens=out.num_cached_tokens,
            ttft_deadline_s=out.timing.ttft_deadline_s,
        )

    def info(self, summary: list[tuple[str, str]]) -> EngineInfo:
        cfg = self.engine.config
        return EngineInfo(
            model_dir=cfg.model_dir,
            max_model_len=cfg.scheduler.max_model_len,
            max_request_tokens=min(
                cfg.scheduler.max_model_len, self.engine.kv_manager.capacity_tokens_per_request
            ),
            vocab_size=cfg.model.vocab_size,
            num_kvp_groups=self.engine.kv_manager.num_kvp_groups,
            tbt_slo_s=cfg.policy.tbt_slo_s,
            summary=summary,
        )


class _Link:
    """The core's end of the control channel: a DEALER with identity `engine-core`."""

    def __init__(self, address: str, secret: bytes) -> None:
        self.codec: Codec[ServerToCore] = Codec(secret, ServerToCore, "engine core")
        self._ctx = zmq.Context()
        self.sock = self._ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, CORE_IDENTITY)
        self.sock.setsockopt(zmq.LINGER, 2000)  # let a final EngineDead get out
        self.sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        self.sock.connect(address)

    def send(self, msg: object) -> None:
        self.sock.send(self.codec.encode(msg))

    def recv(self, timeout_ms: int) -> ServerToCore | None:
        if not self.sock.poll(timeout_ms):
            return None
        return self.codec.decode(self.sock.recv(), "API server")

    def close(self) -> None:
        self.sock.close()
        self._ctx.term()


def run_engine_core(address: str, parent_pid: int | None) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the server decides
    secret = take_core_secret()
    link = _Link(address, secret)
    beater = Heartbeater(address, CORE_SENDER, secret, parent_pid).start()
    core: EngineCore | None = None
    try:
        link.send(CoreHello(os.getpid()))
        start = None
        while not isinstance(start, StartEngine):
            start = link.recv(_IDLE_WAIT_MS)
            if isinstance(start, StopEngine):
                return 0
        started = time.perf_counter()
        config = EngineArgs(**start.engine_args).create_engine_config()
        engine = LLMEngine(config, load_tokenizer(config.model_dir), detokenize=False, copy_outputs=False)
        core = EngineCore(engine, start.max_waiting_requests)
        prepare_to_serve("engine core")
        link.send(CoreReady(core.info(engine_summary(engine, start.model_name, time.perf_counter() - started))))
        _serve(core, link)
        return 0
    except BaseException as e:
        reason = f"{type(e).__name__}: {e}"
        logger.error("engine core failed: %s\n%s", reason, traceback.format_exc())
        link.send(EngineDead(reason))
        return 1
    finally:
        if core is not None:
            core.engine.shutdown()
        beater.stop()
        link.close()


def _serve(core: EngineCore, link: _Link) -> None:
    engine = core.engine
    last_stats: EngineStats | None = None
    while not core.stopped:
        msg = link.recv(0 if engine.has_unfinished_requests() else _IDLE_WAIT_MS)
        while msg is not None or link.sock.poll(0):  # every queued message before the next step
            if msg is not None and (reply := core.handle(msg)) is not None:
                link.send(reply)
            msg = link.recv(0)
        if core.stopped:
            break
        outputs = core.step() if engine.has_unfinished_requests() else []
        if not outputs:
            engine.check_health()
        stats = engine.stats()
        step_stats = engine.take_step_stats()
        if outputs or step_stats or stats != last_stats:
            link.send(StepOutputs(outputs, stats, step_stats, engine.executor.num_rejected_messages))
            last_stats = stats
        if not engine.has_unfinished_requests() and not link.sock.poll(0):  # outputs out, nothing waits
            engine.check_idle_integrity()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mnemosyne.engine.core", description=__doc__.splitlines()[0])
    ap.add_argument("--address", required=True, help="the API server's control port, tcp://HOST:PORT")
    ap.add_argument("--parent-pid", type=int, default=None, help="exit when this parent process is gone")
    ns = ap.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("MNEMOSYNE_LOG_LEVEL", "INFO"), format="%(levelname)s %(name)s: %(message)s"
    )
    return run_engine_core(ns.address, ns.parent_pid)


if __name__ == "__main__":
    sys.exit(main())
