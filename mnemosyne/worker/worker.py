"""One rank's share of the model: run StepPlans in order, stage by stage.

Per plan, on rank (kvp_rank g, spp_rank s, tp_rank t)::

    apply plan updates (forget finished, drop freed KV, remember new sampling params;
                        reporting ranks feed every chunk's tokens to the TokenHistory of
                        requests with penalties, whichever group owns the chunk)
    sub-batch of group g  (worker/sub_batch.py)
    decode aheads?        (async scheduling, spp == 1) their input ids = the previous plan's
                          samples: one all-reduce over every rank, idle groups too, then
                          put in place on the device (worker/decode_ahead.py)
    s == 0 ?  x = input ids  :  x = recv hidden states from stage s-1 of group g (1/tp slice,
                                  all-gathered over TP)
    hidden = this stage's layers (TP all-reduces inside; KVP merge inside attention)
    s < last ?  isend hidden to stage s+1 of group g  -> None
              :  logits of the rows group g owns -> sample (tp rank 0 reports a StepResult,
                 its sampled ids copied to the host without waiting: worker/pending_result.py)

Every rank takes every plan, in plan order. A group with an empty sub-batch returns at
once when the plan has no shared tokens; when it has (with kvp >= 3 a request can span
some groups and not others), the group is idle: no compute, no stage send, but each rank
joins its layers' KVP all-gathers with an empty contribution (`LlamaForCausalLM.run_idle`),
since the collective needs every group.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from concurrent.futures import Future
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from mnemosyne.config import EngineConfig
from mnemosyne.kernels.cudnn_plans import warm_up_cudnn
from mnemosyne.kernels.jit_watch import watch_jit_compiles
from mnemosyne.layers.attention.kernel_backend import KernelBackend
from mnemosyne.layers.attention.kernel_plan import KernelPlan, chunk_launches
from mnemosyne.layers.attention.metadata import to_device_packed
from mnemosyne.layers.attention.selector import make_attention_backend
from mnemosyne.layers.logits_processors import TokenHistory
from mnemosyne.layers.sampler import Sampler, SamplerOutput, compute_prompt_logprobs
from mnemosyne.models.loader import load_model
from mnemosyne.parallel.groups import ProcessGroups
from mnemosyne.parallel.messages import SyntheticKVFilled
from mnemosyne.sampling_params import SamplingParams
from mnemosyne.wire.plan import LaneChunkTiming, StepPath, StepPlan, StepResult, StepTrace
from mnemosyne.worker.block_table import BlockTableMirror
from mnemosyne.worker.cuda_graph import DecodeGraphs
from mnemosyne.worker.decode_ahead import DecodeAheadTokens
from mnemosyne.worker.kv_caches import allocate_kv_caches
from mnemosyne.worker.mixed_graph import MixedGraphs
from mnemosyne.worker.pending_result import PendingResult
from mnemosyne.worker.piecewise_graph import PiecewiseGraphs
from mnemosyne.worker.prefill_lane import PrefillLane, warm_up_linears
from mnemosyne.worker.sampling_warm_up import warm_up_sampling
from mnemosyne.worker.stage_link import StageLink
from mnemosyne.worker.sub_batch import SubBatch, build_sub_batch
from mnemosyne.worker.synthetic_kv import fill_blocks

logger = logging.getLogger(__name__)

_SEED_MIX = 1_000_003


def sampling_generator(seed: int, position: int, device: torch.device) -> torch.Generator:
    """The generator of a seeded request's token at `position`: a function of (seed, position)
    only, so a seed gives the same tokens on any layout, batch or preemption history."""
    return torch.Generator(device=device).manual_seed((seed * _SEED_MIX + position) % (1 << 63))


@dataclass
class Sampled:
    request_ids: list[str]  # of the output's rows
    output: SamplerOutput


def step_trace(path: StepPath, backend_plan: object, steps_sms: int | None = None) -> StepTrace:
    """The step's path, its SMs (`StepTrace.steps_sms`) and, when its attention ran eagerly on
    the kernel backend, what the chunks ran on (the plan the first layer built); graph replays
    keep their fixed plans."""
    if path in (StepPath.PIECEWISE, StepPath.EAGER) and isinstance(backend_plan, KernelPlan):
        splits = tuple(launch.splits for launch in chunk_launches(backend_plan))
        return StepTrace(path, len(backend_plan.dense), splits, steps_sms)
    return StepTrace(path, steps_sms=steps_sms)


class Worker:
    def __init__(self, config: EngineConfig, pg: ProcessGroups, device: torch.device) -> None:
        self.config = config
        self.pg = pg
        self.device = device
        self.group = pg.coords.kvp_rank
        self.block_size = config.cache.block_size
        num_blocks = config.cache.num_blocks_per_group[self.group]
        backend = make_attention_backend(config.attention_backend, config.model, pg.tp.size, device)
        self.model = load_model(
            config.model_dir, config.model, backend, device, pg, config.load_format, config.seed
        )
        self.kv_caches = allocate_kv_caches(self.model, num_blocks, self.block_size)
        lane = config.scheduler.prefill_lane
        # JIT and cuDNN plans before serving, not on the first steps
        if device.type == "cuda" and self.kv_caches:
            sched = config.scheduler
            max_prefix_tokens = min(num_blocks * self.block_size, sched.max_model_len)
            max_chunk_tokens = max(sched.max_num_batched_tokens, lane.chunk_tokens if lane is not None else 0)
            exact_query_lens = (lane.chunk_tokens,) if lane is not None else ()  # every lane chunk's
            for window in {None, config.model.sliding_window}:
                backend.warm_up(
                    *self.kv_caches[0], window, sched.max_num_seqs, max_chunk_tokens, max_prefix_tokens,
                    exact_query_lens,
                )  # fmt: skip
        pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None  # shared by all graphs
        self.graphs = DecodeGraphs.create(config, self.model, self.kv_caches, backend, device, pool)
        self.mixed = MixedGraphs.create(config, self.model, self.kv_caches, backend, device, pool)
        self.piecewise = PiecewiseGraphs.create(config, self.model, device, pool)
        self.lane: PrefillLane | None = None
        if lane is not None:
            # torch keeps cuDNN's attention graphs per thread: the lane's thread builds its own
            shapes = backend.cudnn_shapes if isinstance(backend, KernelBackend) else None
            warm_up = (lambda: warm_up_cudnn(shapes, *self.kv_caches[0])) if shapes else (lambda: None)
            self.lane = PrefillLane(
                device, lane.steps_sms_choices, warm_up, lambda: warm_up_linears(self.model, lane.chunk_tokens)
            )
            self.lane.pace(self.model.layers)
            # the steps' graphs once more per split, on its steps' SMs
            self.lane.add_step_graphs(
                lambda stream: DecodeGraphs.create(config, self.model, self.kv_caches, backend, device, pool, stream),
                lambda stream, sms: MixedGraphs.create(
                    config, self.model, self.kv_caches, backend, device, pool, stream, sms
                ),
            )
        self.capture_s = self._capture_graphs()
        self.sampler = Sampler()
        if device.type == "cuda" and pg.is_last_stage:
            seconds = warm_up_sampling(self.model, self.sampler, config.scheduler.max_num_seqs, device)
            logger.info("rank %d: LM head and sampling warmed up for 1-%d rows in %.2f s",
                        pg.rank, config.scheduler.max_num_seqs, seconds)  # fmt: skip
        # From here on a Triton compile stalls a step: log it (none is expected).
        self.jit_watch = watch_jit_compiles() if device.type == "cuda" else None
        self.mirror = BlockTableMirror(self.group, num_blocks, device)
        self.params: dict[str, SamplingParams] = {}
        # Requests with penalties or min_tokens, on reporting ranks only; any group may own a
        # request's next chunk, so every reporting rank follows every such request.
        self.histories: dict[str, TokenHistory] = {}
        # Unseeded sampling: one stream per KVP group (each group samples its own requests).
        self.rng = torch.Generator(device=device).manual_seed(config.seed + _SEED_MIX * self.group)
        self.stage = StageLink(pg, config.model.hidden_size, config.model.dtype, device)
        self._previous: PendingResult | None = None  # the last plan's result (decode-ahead inputs)
        self._previous_decode_only = False  # the last plan had no prefill token
        self._ahead: DecodeAheadTokens | None = None  # the current plan's decode-ahead inputs

    def steps_stream(self) -> AbstractContextManager:
        """The stream a step launches on: beside a prefill lane chunk, the SMs the chunk leaves
        it (worker/prefill_lane.py); else the current one."""
        return self.lane.steps_stream() if self.lane is not None else nullcontext()

    @torch.inference_mode()
    def execute_async(self, plan: StepPlan) -> PendingResult | None:
        """Run (launch, on CUDA) this rank's part of `plan`. Returns the group's result on
        the reporting rank (last stage, tp rank 0), None elsewhere; its sampled ids arrive
        on the host when `PendingResult.wait` returns."""
        with self.steps_stream():
            return self._execute(plan)

    def _execute(self, plan: StepPlan) -> PendingResult | None:
        steps_sms = self.lane.steps_sms if self.lane is not None else None
        self._observe_decode_aheads()
        self._previous_decode_only = plan.is_decode_only
        self._apply_updates(plan)
        batch = build_sub_batch(plan, self.mirror, self.block_size, self.device)
        # Every rank, idle or not, whenever the plan has decode aheads (a world collective).
        needs_host = bool(self.histories) and any(
            c.is_decode_ahead and c.request_id in self.histories for c in plan.chunks
        )
        self._ahead = DecodeAheadTokens.exchange(plan, self._previous, self.pg.world, self.device, needs_host)
        if self._ahead is not None:
            self._ahead.fill(batch)
        result = StepResult(plan.step_id) if self.pg.is_reporting_rank else None
        if batch.num_tokens == 0:
            self.model.run_idle(plan.num_shared_tokens)  # a no-op without shared tokens
            if result is not None:
                result.trace = StepTrace(StepPath.IDLE, steps_sms=steps_sms)
            return self._finish(result, None)  # the reporting rank's empty result; None elsewhere

        x = batch.input_ids if self.pg.is_first_stage else self.stage.recv(batch.num_tokens)
        hidden: torch.Tensor | None = None  # [num_tokens, hidden]
        path = StepPath.EAGER
        graphs, mixed = self.graphs, self.mixed
        if steps_sms is not None and self.lane is not None:  # beside a lane chunk: its split's
            graphs, mixed = self.lane.decode_graphs.get(steps_sms), self.lane.mixed_graphs.get(steps_sms)
        if graphs is not None and graphs.can_run(batch.meta):
            hidden, path = graphs.run(x, batch.positions, batch.meta), StepPath.DECODE_GRAPH
        elif mixed is not None:
            hidden, path = mixed.try_run(x, batch.positions, batch.meta), StepPath.MIXED_GRAPH
        if hidden is None:
            if self.piecewise is not None and self.piecewise.can_run(batch.num_tokens):
                hidden, path = (
                    self.piecewise.run(x, batch.positions, self.kv_caches, batch.meta),
                    StepPath.PIECEWISE,
                )
            else:
                hidden, path = self.model(x, batch.positions, self.kv_caches, batch.meta), StepPath.EAGER
        if not self.pg.is_last_stage:
            self.stage.send(hidden)
            return None
        if result is not None:
            result.trace = step_trace(path, batch.meta.backend_plan, steps_sms)
        return self._finish(result, self._sample(batch, hidden, result))

    @torch.inference_mode()
    def execute_lane_async(self, plan: StepPlan, steps_sms: int | None) -> Future[StepResult]:
        """Launch `plan`, the prefill lane's chunk (no sampling, no decode aheads; one device),
        on the lane (worker/prefill_lane.py), leaving the steps `steps_sms` SMs meanwhile (None
        on CPU). Its updates are applied here, in plan order with the steps' plans, and its
        inputs built on the steps' stream; the Future's result comes when its kernels are done."""
        lane = self.config.scheduler.prefill_lane
        assert self.lane is not None and lane is not None and self.pg.world.size == 1
        assert not any(c.sample or c.is_decode_ahead for c in plan.chunks), "a lane chunk never samples"
        with self.steps_stream():
            self._apply_updates(plan)
            # one row count for every chunk (a shorter one padded): worker/prefill_lane.py
            batch = build_sub_batch(plan, self.mirror, self.block_size, self.device, pad_to=lane.chunk_tokens)
            forward = lambda: self.model(batch.input_ids, batch.positions, self.kv_caches, batch.meta)  # noqa: E731

            def finish(timing: LaneChunkTiming) -> StepResult:
                trace = step_trace(StepPath.EAGER, batch.meta.backend_plan)
                return StepResult(plan.step_id, trace=dataclasses.replace(trace, lane=timing))

            return self.lane.launch(forward, keep=batch, finish=finish, steps_sms=steps_sms)

    def _apply_updates(self, plan: StepPlan) -> None:
        """Forget finished requests, drop freed KV, remember new sampling params; feed the
        chunks' tokens to the histories of requests with penalties."""
        for rid in plan.finished:
            self.params.pop(rid, None)
            self.histories.pop(rid, None)
            self.mirror.drop(rid)
        for rid in plan.freed_kv:
            self.mirror.drop(rid)
        for new in plan.new_requests:
            self.params[new.request_id] = new.sampling_params
            if self.pg.is_reporting_rank and new.sampling_params.needs_history:
                self.histories[new.request_id] = TokenHistory(
                    new.num_prompt_tokens, new.prompt_token_ids, new.min_tokens_banned_ids
                )
        if self.histories:
            for chunk in plan.chunks:
                history = self.histories.get(chunk.request_id)
                if history is not None and not chunk.is_decode_ahead:  # else seen from self._ahead
                    history.observe(chunk.start, chunk.token_ids)

    def reports_previous_first(self, plan: StepPlan) -> bool:
        """Whether the result of the plan before `plan` should reach the engine before `plan`
        is launched: `plan` has prefill tokens, more than the piecewise graphs take (or there
        are no graphs), so it launches eagerly, layer by layer from Python, which holds the
        host 7.6-25 ms on an H200 (benchmarks/results/session11_h200x2_2026-11-30/
        eager_launch_host_*); and the plan before it is decode-only, so it has at most a few
        ms of device time left. Launched first, the eager plan would hold the decodes' tokens
        back for its whole launch (the 15-21 ms decode steps of the 1B serving trace).
        Always on a later pipeline stage (spp > 1): its launch of `plan` can hold the host
        until the stage before has run `plan` (what holds it was not isolated; the effect was
        measured), and with spp micro-batches in flight the driver submits the stage before's
        next plan only on this report, so the stages took turns instead of overlapping (8B,
        one 512K prompt in 4096-token chunks on two H200s: spp2 95 s, and over 120 s on a
        second try, against 74 s with 4 micro-batches in flight and 72.7 s reporting first;
        benchmarks/results/README.md, "Twenty-first session").

        False on CPU, where a plan has run when its launch returns."""
        if self.device.type != "cuda":
            return False
        if not self.pg.is_first_stage:
            return True
        if not self._previous_decode_only or plan.is_decode_only:
            return False
        return self.piecewise is None or plan.num_batched_tokens > self.piecewise.max_tokens

    def _finish(self, result: StepResult | None, sampled: Sampled | None) -> PendingResult | None:
        """The plan's pending result, kept as the source of the next plan's decode-ahead inputs."""
        if result is None:
            return None
        if sampled is None:
            sampled = Sampled([], SamplerOutput(torch.empty(0, dtype=torch.long, device=self.device)))
        self._previous = PendingResult.start(result, sampled.request_ids, sampled.output)
        return self._previous

    def _observe_decode_aheads(self) -> None:
        """Feed the last plan's decode-ahead inputs to the histories of their requests, on
        every reporting rank, owner or not (the next owner may be another group; the
        sampling owner saw them in `_sample` already). Called when the next plan starts, so
        it never waits for a forward."""
        ahead, self._ahead = self._ahead, None
        if ahead is None or ahead.host_tokens is None:
            return
        for chunk in ahead.chunks:
            history = self.histories.get(chunk.request_id)
            if history is not None:
                history.observe(chunk.start, (ahead.host_token(chunk.request_id),))

    def _capture_graphs(self) -> float:
        """Capture every CUDA graph now, before serving (no step ever waits for a capture);
        the seconds it took."""
        t0 = time.perf_counter()
        with torch.inference_mode():
            lane_graphs = self.lane.step_graphs if self.lane is not None else []
            for graphs in (self.graphs, self.mixed, self.piecewise, *lane_graphs):
                if graphs is not None:
                    graphs.capture_all()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        if self.graphs is not None or self.mixed is not None or self.piecewise is not None:
            num_decode = sum(len(g.graphs) for g in (self.graphs, *lane_graphs) if isinstance(g, DecodeGraphs))
            num_mixed = sum(len(g.graphs) for g in (self.mixed, *lane_graphs) if isinstance(g, MixedGraphs))
            num_piecewise = len(self.piecewise.pieces) if self.piecewise is not None else 0
            logger.info(
                "rank %d: captured %d decode graphs, %d mixed-step graphs and %d piecewise step sizes in %.1f s",
                self.pg.rank, num_decode, num_mixed, num_piecewise, seconds,
            )  # fmt: skip
        return seconds

    def _sample(self, batch: SubBatch, hidden: torch.Tensor, result: StepResult | None) -> Sampled | None:
        """Logits of the owned rows (prompt-logprob rows, then sample rows) and sampling:
        what was sampled, still on the device (None if nothing); `result`'s prompt logprobs
        filled.

        Every TP rank computes the logits (the vocab-parallel head all-gathers them);
        only the reporting rank samples."""
        plp_rows: list[int] = []
        plp_spans: list[tuple[int, int, int]] = []  # (chunk index, first position, first row)
        sample_rows: list[int] = []
        sample_chunks: list[int] = []
        for i, (chunk, row0) in enumerate(zip(batch.chunks, batch.row_starts, strict=True)):
            if not batch.owned[i]:
                continue
            n = len(chunk.prompt_logprob_targets)
            if n:
                p0 = chunk.prompt_logprob_start
                plp_spans.append((i, p0, len(plp_rows)))
                plp_rows.extend(row0 + p - chunk.start for p in range(p0, p0 + n))
            if chunk.sample:
                sample_rows.append(row0 + chunk.num_tokens - 1)
                sample_chunks.append(i)
        if not plp_rows and not sample_rows:
            return None
        rows = plp_rows + sample_rows
        if rows != list(range(hidden.shape[0])):  # else (a decode-only batch) every row, in order
            hidden = hidden[to_device_packed((rows,), torch.long, self.device)[0]]  # no device sync
        logits = self.model.compute_logits(hidden).float()  # [num_rows, vocab_size]
        if result is None:
            return None

        for i, p0, row_lo in plp_spans:
            chunk = batch.chunks[i]
            targets = torch.tensor(chunk.prompt_logprob_targets, dtype=torch.long, device=self.device)
            k = self.params[chunk.request_id].prompt_logprobs or 0
            entries = compute_prompt_logprobs(logits[row_lo : row_lo + len(targets)], targets, k)
            result.prompt_logprobs[chunk.request_id] = (p0, entries)

        if not sample_chunks:
            return None
        chunks = [batch.chunks[i] for i in sample_chunks]
        params = [self.params[c.request_id] for c in chunks]
        gens = [self._generator(p, c.end) for p, c in zip(params, chunks, strict=True)]
        histories = [self.histories.get(c.request_id) for c in chunks] if self.histories else None
        if histories:
            for chunk, history in zip(chunks, histories, strict=True):
                if history is not None and chunk.is_decode_ahead:  # its input (waits for the exchange)
                    assert self._ahead is not None
                    history.observe(chunk.start, (self._ahead.host_token(chunk.request_id),))
        output = self.sampler(logits[len(plp_rows) :], params, gens, histories)
        return Sampled([c.request_id for c in chunks], output)

    def fill_synthetic_kv(self, request_id: str, seed: int) -> SyntheticKVFilled:
        """BENCHMARK-ONLY: N(0, 1) K/V into every block this rank mirrors for `request_id`
        (worker/synthetic_kv.py); nothing if the request has no piece on this group."""
        block_ids = self.mirror.get(request_id).block_ids if request_id in self.mirror else []
        rank_seed = (seed * _SEED_MIX + self.pg.rank) % (1 << 63)
        with self.steps_stream():  # after the steps launched so far
            num_bytes, mean_square = fill_blocks(self.kv_caches, block_ids, rank_seed)
        return SyntheticKVFilled(self.pg.rank, self.group, len(block_ids), num_bytes, mean_square)

    def _generator(self, params: SamplingParams, position: int) -> torch.Generator | None:
        if params.greedy:
            return None
        if params.seed is None:
            return self.rng
        return sampling_generator(params.seed, position, self.device)

    def shutdown(self) -> None:
        self.stage.wait()
        if self.lane is not None:
            self.lane.shutdown()
            self.lane = None
        if self.graphs is not None:
            self.graphs.close()
            self.graphs = None
        if self.mixed is not None:
            self.mixed.close()
            self.mixed = None
        if self.piecewise is not None:
            self.piecewise.close()
            self.piecewise = None
