"""The prefill lane's device side: a long prompt's chunks on SMs of their own, from a thread of
their own, beside the engine's steps (engine/prefill_lane.py is the driver's side).

    main thread (the worker)                 lane thread                 lane stream
    ingest the plan, build its sub-batch     (one, long-lived)           (green context: every SM
    (H2D copies on the current stream)                                    but `free_sms`, CUDA)
    record `ready` on the current stream --> wait `ready` -------------> forward(chunk), KV writes
    return a Future                          record `done`, sync on it
                                             (the GIL is released)
    Future done  <=  the chunk's kernels have finished on the device

Why a thread: a 4096-token chunk's eager forward launches ~10 ms of kernels from Python,
and launched from the engine's thread it would hold the decodes' tokens that long. Why a
green context: without a partition the decodes' kernels wait for the chunk kernels'
long-running thread blocks (45-69-ms tokens on an H200); with `free_sms` SMs the lane never
takes, the steps always start at once (benchmarks/results/README.md, "Twenty-second session"
and "Twenty-third session": a 256K-token prompt beside 32 decodes, 16 SMs free: 44.0 s, 1.24x
its floor, token periods p99 25.6 ms). The engine's steps stay on the worker's own stream
(all SMs, their CUDA graphs as before): no step waits for the lane unless the driver
makes it (a request's last prompt token runs in a step after its lane chunks are done).

torch keeps cuDNN's attention graphs per thread: `warm_up` runs on the lane thread before
serving, so the lane never builds one mid-run (0.6-s stalls in the probe otherwise).

Memory: the sub-batch's tensors were allocated on the worker's stream; the Future holds them
until the lane's kernels are done, so the allocator cannot hand them to the steps early.
The lane's own activations come from the lane stream's pool.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

from mnemosyne.worker.green_context import split_sms

logger = logging.getLogger(__name__)

T = TypeVar("T")


class PrefillLane:
    def __init__(self, device: torch.device, free_sms: int, warm_up: Callable[[], None]) -> None:
        self.device = device
        self.stream: torch.cuda.Stream | None = None  # None on CPU: the thread shares the cores
        if device.type == "cuda":
            split = split_sms(device, free_sms)
            self.stream = split.rest
            logger.info("prefill lane: %d SMs, %d left to the steps", split.rest_sms, split.first_sms)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefill-lane")
        self._thread.submit(self._on_lane, warm_up).result()  # cuDNN's graphs are per thread

    def launch(self, forward: Callable[[], object], keep: object, result: T) -> Future[T]:
        """Run `forward` on the lane after everything launched so far on the current stream;
        the Future gives `result` once its kernels are done. `keep`: inputs to hold until then."""
        ready: torch.cuda.Event | None = None
        if self.stream is not None:
            ready = torch.cuda.Event()
            ready.record()
        return self._thread.submit(self._run, forward, ready, keep, result)

    def _run(
        self, forward: Callable[[], object], ready: torch.cuda.Event | None, keep: object, result: T
    ) -> T:
        if self.stream is None or ready is None:
            self._on_lane(forward)
            return result
        self.stream.wait_event(ready)
        self._on_lane(forward)
        done = torch.cuda.Event()
        done.record(self.stream)
        done.synchronize()  # (releases the GIL)
        del keep  # held until the kernels that read it are done
        return result

    def _on_lane(self, fn: Callable[[], object]) -> None:
        with torch.inference_mode():
            if self.stream is None:
                fn()
                return
            with torch.cuda.stream(self.stream):
                fn()

    def shutdown(self) -> None:
        self._thread.shutdown(wait=True)
