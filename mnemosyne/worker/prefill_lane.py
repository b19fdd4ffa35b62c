"""The prefill lane's device side: a long prompt's chunks on SMs of their own, from a thread of
their own, beside the engine's steps, which are confined to the SMs the chunk leaves them
(engine/prefill_lane.py is the driver's side).

    main thread (the worker)                 lane thread                 lane stream
    ingest the plan, build its sub-batch     (one, long-lived)           rest(S): green context of
    (H2D copies on the steps' stream)                                    all but S SMs, chosen per
    record `ready` on the steps' stream --> wait `ready` -------------> chunk; forward(chunk)
    return a Future                          record `done`, sync on it
                                             (the GIL is released)
    Future done  <=  the chunk's kernels have finished on the device

    the steps' stream (`steps_stream`, chosen at each step's launch):
      the oldest chunk not done ran with S  ->  first(S): a green context of those S SMs
      no chunk in flight                    ->  the worker's own stream (every SM)
      on a change: the new stream waits for the old one (every step stays in launch order)

    splits (made at start-up, one per choice of S):  |-- first(S): steps --|----- rest(S): lane -----|
    first(16) is inside first(24) (the driver hands out the same SMs first; measured with
    %smid, benchmarks/probes/green_context_sms.py), and first and rest are disjoint

    the steps' decode and mixed-step graphs: captured once more per split, on first(S)
    (`add_step_graphs`; the piecewise graphs are not, and run on every SM beside a chunk),
    their decode kernel with launch options for a few SMs (`KernelPlan.decode_confined`):
    a graph's kernels keep the SMs of the stream it was captured on, whichever stream replays
    it (a copy graph captured on a plain stream: 1.58 ms replayed on first(16), as on the
    whole GPU; captured on first(16): 10.0 ms)

Why a thread: a 4096-token chunk's eager forward launches ~10 ms of kernels from Python,
and launched from the engine's thread it would hold the decodes' tokens that long. Why the
chunks confined: without a partition the decodes' kernels wait for the chunk kernels'
long-running thread blocks (45-69-ms tokens on an H200). Why the steps confined too: their
time is then a function of S, which the driver chooses per chunk as the decodes' context
grows (engine/prefill_lane.py, latency/beside_lane.py `fewest_sms`; on an H200, 8B, a
256K-token prompt beside 32 decodes: each 10-s window's p99 within 28.4 ms). Not measured:
paced launches with the steps on every SM. Why paced (`pace`): unpaced, the token gaps had
a p99 of 40-43 ms whatever the split, paced 28.0 ms (benchmarks/results/README.md,
"Twenty-second session" to "Twenty-fourth session").

torch keeps cuDNN's attention graphs per thread: `warm_up` runs on the lane thread before
serving, so the lane never builds one mid-run (0.6-s stalls in the probe otherwise). Every
chunk has the same row count: the worker pads a shorter one (a prompt's last) to the lane's
chunk size (`build_sub_batch(pad_to=)`), and `warm_up_stream` runs the model's linear shapes at
that count on each split's stream. A chunk of a new row count costs the thread host time in
the calls that meet it first (cuBLAS's choice and set-up of a kernel per shape, with the GIL
held; 2-4 ms a shape on the engine's thread, 19-28 ms on this one, why is not known): a
prompt's last, odd-sized chunk took ~120 ms more launching than the others, and two of the
decodes' token gaps 45-50 ms as it started (benchmarks/results/README.md, "Twenty-eighth
session").

Memory: the sub-batch's tensors were allocated on the steps' stream; the Future holds them
until the lane's kernels are done, so the allocator cannot hand them to the steps early.
The lane's activations come from its stream's pool (one per split; the engine's memory
reserve counts each, engine/args.py), and each steps' stream keeps a pool of its own too.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from typing import TypeVar

import torch

from mnemosyne.layers.linear import Linear
from mnemosyne.wire.plan import LaneChunkTiming
from mnemosyne.worker.cuda_graph import DecodeGraphs
from mnemosyne.worker.green_context import SmSplit, split_sms
from mnemosyne.worker.mixed_graph import MixedGraphs

logger = logging.getLogger(__name__)

T = TypeVar("T")
LANE_LAYERS_AHEAD = 2  # layers of a chunk launched ahead of the lane's device work (`pace`)


class PrefillLane:
    def __init__(
        self,
        device: torch.device,
        steps_sms_choices: Sequence[int],
        warm_up: Callable[[], None],
        warm_up_stream: Callable[[], None] = lambda: None,
    ) -> None:
        """`steps_sms_choices`: the SM counts a chunk may leave the steps (one split each).
        On the lane thread before serving: `warm_up` once, `warm_up_stream` on each split's
        lane stream (module docstring)."""
        self.device = device
        self._splits: dict[int, SmSplit] = {}  # empty on CPU: the thread shares the cores
        self._steps: torch.cuda.Stream | None = None  # the stream of the steps' latest launch
        self._base: torch.cuda.Stream | None = None  # the worker's own stream (every SM)
        self.steps_sms: int | None = None  # the SMs of the steps' stream now; None: every SM
        if device.type == "cuda":
            self._base = self._steps = torch.cuda.current_stream(device)
            for steps_sms in steps_sms_choices:
                self._splits[steps_sms] = split = split_sms(device, steps_sms)
                logger.info("prefill lane split: %d SMs for the lane, %d for the steps", split.rest_sms, split.first_sms)
        # per split: the steps' graphs captured on its first(S) stream
        self.decode_graphs: dict[int, DecodeGraphs] = {}
        self.mixed_graphs: dict[int, MixedGraphs] = {}
        # the chunks launched and not yet seen done, oldest first: (Future, steps_sms)
        self._in_flight: deque[tuple[Future, int]] = deque()
        self._layer_done: deque[torch.cuda.Event] = deque()  # the current chunk's latest layers (`pace`)
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._paced_s = 0.0  # the current chunk's waits in `pace` (lane thread only)
        self._thread_id = 0  # the lane thread's (threading.get_ident), known after the warm-up
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefill-lane")
        self._thread.submit(self._on_lane, None, warm_up).result()  # cuDNN's graphs are per thread
        for split in self._splits.values():  # (cuBLAS keeps a workspace per stream)
            self._thread.submit(self._on_lane, split.rest, warm_up_stream).result()

    def pace(self, layers: Sequence[torch.nn.Module]) -> None:
        """Launch a chunk at most LANE_LAYERS_AHEAD of `layers` ahead of the device: before each
        layer, the lane thread waits (without the GIL) for the layer that many back. A chunk is
        ~500 launches that run for up to a second; launched at once they fill the launch queue,
        and a launch that waits for room holds the GIL, so the engine's thread could not read
        the steps' tokens until a lane kernel ended (module docstring). A no-op on CPU and on
        any other thread (the hooks see every forward)."""
        if self._steps is not None:
            self._hooks = [layer.register_forward_pre_hook(self._before_layer) for layer in layers]

    def _before_layer(self, module: torch.nn.Module, args: object) -> None:
        if threading.get_ident() != self._thread_id:
            return
        while len(self._layer_done) >= LANE_LAYERS_AHEAD:
            t0 = time.perf_counter()
            self._layer_done.popleft().synchronize()  # (releases the GIL)
            self._paced_s += time.perf_counter() - t0
        done_so_far = torch.cuda.Event()
        done_so_far.record()  # on the lane stream: the layers launched before this one
        self._layer_done.append(done_so_far)

    def add_step_graphs(
        self,
        make_decode: Callable[[torch.cuda.Stream], DecodeGraphs | None],
        make_mixed: Callable[[torch.cuda.Stream, int], MixedGraphs | None],
    ) -> None:
        """The steps' decode and mixed-step graphs of each split, from `make_decode(its
        first(S) stream)` and `make_mixed(that stream, S)`, to be captured with the worker's: a
        graph keeps the SMs of the stream it was captured on."""
        for steps_sms, split in self._splits.items():
            decode, mixed = make_decode(split.first), make_mixed(split.first, steps_sms)
            if decode is not None:
                self.decode_graphs[steps_sms] = decode
            if mixed is not None:
                self.mixed_graphs[steps_sms] = mixed

    @property
    def step_graphs(self) -> list[DecodeGraphs | MixedGraphs]:
        return [*self.decode_graphs.values(), *self.mixed_graphs.values()]

    @property
    def steps_sms_choices(self) -> tuple[int, ...]:
        """The choices of `launch`'s `steps_sms`; empty on CPU (no split)."""
        return tuple(self._splits)

    def steps_stream(self) -> AbstractContextManager:
        """A context on the stream the steps launch on now (module docstring): first(S) of the
        oldest chunk still running, else the worker's own; a no-op on CPU. Sets `steps_sms`."""
        if self._steps is None:
            return nullcontext()
        while self._in_flight and self._in_flight[0][0].done():
            self._in_flight.popleft()
        self.steps_sms = self._in_flight[0][1] if self._in_flight else None
        stream = self._base if self.steps_sms is None else self._splits[self.steps_sms].first
        assert stream is not None
        if stream is not self._steps:
            stream.wait_stream(self._steps)  # the steps stay in launch order across streams
            self._steps = stream
        return torch.cuda.stream(stream)

    def launch(
        self,
        forward: Callable[[], object],
        keep: object,
        finish: Callable[[LaneChunkTiming], T],
        steps_sms: int | None,
    ) -> Future[T]:
        """Run `forward` on the lane, leaving the steps `steps_sms` SMs meanwhile (one of
        `steps_sms_choices`; None on CPU), after everything launched so far on the current
        stream (the steps'); the Future gives `finish(the chunk's timing)`, called on the lane
        thread once its kernels are done. `keep`: inputs to hold until then."""
        ready: torch.cuda.Event | None = None
        stream: torch.cuda.Stream | None = None
        if self._splits:
            if steps_sms not in self._splits:
                raise ValueError(f"no lane split leaves {steps_sms} SMs; the choices are {self.steps_sms_choices}")
            stream = self._splits[steps_sms].rest
            ready = torch.cuda.Event()
            ready.record()
        future = self._thread.submit(self._run, stream, forward, ready, keep, finish)
        if stream is not None:
            self._in_flight.append((future, steps_sms))
        return future

    def _run(
        self,
        stream: torch.cuda.Stream | None,
        forward: Callable[[], object],
        ready: torch.cuda.Event | None,
        keep: object,
        finish: Callable[[LaneChunkTiming], T],
    ) -> T:
        t0 = time.perf_counter()
        if stream is None or ready is None:
            self._on_lane(None, forward)
            return finish(LaneChunkTiming(launch_s=time.perf_counter() - t0, paced_s=0.0, device_s=0.0))
        allocator_before = _allocator_counts(self.device)
        stream.wait_event(ready)
        start = torch.cuda.Event(enable_timing=True)
        start.record(stream)
        self._layer_done.clear()
        self._paced_s = 0.0
        self._on_lane(stream, forward)
        launch_s = time.perf_counter() - t0
        done = torch.cuda.Event(enable_timing=True)
        done.record(stream)
        done.synchronize()  # (releases the GIL); the next chunk launches only after this one ran
        del keep  # held until the kernels that read it are done
        allocs, frees, retries = (a - b for a, b in zip(_allocator_counts(self.device), allocator_before))
        timing = LaneChunkTiming(
            launch_s=launch_s, paced_s=self._paced_s, device_s=start.elapsed_time(done) / 1e3,
            num_device_allocs=allocs, num_device_frees=frees, num_alloc_retries=retries,
        )  # fmt: skip
        return finish(timing)

    def _on_lane(self, stream: torch.cuda.Stream | None, fn: Callable[[], object]) -> None:
        self._thread_id = threading.get_ident()
        with torch.inference_mode(), (torch.cuda.stream(stream) if stream is not None else nullcontext()):
            fn()

    def shutdown(self) -> None:
        self._thread.shutdown(wait=True)
        for hook in self._hooks:
            hook.remove()
        for graphs in self.step_graphs:
            graphs.close()
        self.decode_graphs.clear()
        self.mixed_graphs.clear()


def _allocator_counts(device: torch.device) -> tuple[int, int, int]:
    """(cudaMalloc calls, cudaFree calls, retried allocations) of torch's caching allocator
    on `device` so far."""
    stats = torch.cuda.memory_stats(device)
    return stats.get("num_device_alloc", 0), stats.get("num_device_free", 0), stats.get("num_alloc_retries", 0)


def warm_up_linears(model: torch.nn.Module, num_rows: int) -> None:
    """Run each distinct weight shape of `model`'s linear layers once at `num_rows` rows, on
    the current thread and stream (`PrefillLane`'s `warm_up_stream`)."""
    seen: set[tuple[int, ...]] = set()
    for module in model.modules():
        if isinstance(module, Linear) and tuple(module.weight.shape) not in seen:
            seen.add(tuple(module.weight.shape))
            x = torch.zeros(num_rows, module.weight.shape[1], dtype=module.weight.dtype, device=module.weight.device)
            torch.nn.functional.linear(x, module.weight)
