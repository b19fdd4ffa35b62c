"""Host (CPU) time of one decode step through `LLMEngine.step`, phase by phase.

    python -m benchmarks.host_overhead --out benchmarks/results/host_overhead_cpu_DATE.json

A random tiny Llama (`tiny-llama`, dummy weights, float32) on CPU with the reference
attention. N requests (--batch-sizes) decode together in steady state; then one request
decodes alone after a long prefix (--contexts) whose KV is synthetic
(`mnemosyne/bench/long_context/synthetic_kv.py`: its prefill computes only each chunk's last
token), to show whether host work grows with the context.

What is timed (time.perf_counter around the engine's own functions, wrapped on this
engine's instances only)::

    step                 LLMEngine.step, end to end
      schedule           Scheduler.schedule
      predict            LLMEngine.predict_step (latency model)
      plan               PlanBuilder.build
      execute            executor.submit -> Worker.execute
        sub_batch        build_sub_batch (block-table mirror, AttentionMetadata.build)
        forward    GPU   the model's forward (on a GPU: a CUDA graph replay)     excluded
        sample           Worker._sample
          lm_head  GPU   model.compute_logits                                   excluded
          sampler        Sampler.__call__
      process            LLMEngine._process (stop rules, outputs; no detokenizer: the
                         random model has no tokenizer)

    host = step - forward - lm_head

On a GPU the forward and the LM head are device work the host only launches (the decode
forward is one graph replay plus its input copies, which this CPU run does not exercise),
so `host` is what a step costs the CPU besides them. On CPU these are CPU numbers of this
machine, not GPU claims. `--profile` prints a cProfile of the N=16 case instead.

On a GPU (`--device cuda [--shape llama3-8b]`: bfloat16, the Triton kernels, CUDA graphs),
`forward` (the worker's model call or graph replay, input copies included) and `lm_head`
synchronize the device before and after, so they hold the device work and every other
phase is host time alone (the sampler's `.tolist()` no longer waits for the GPU).
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import json
import platform
import pstats
import shlex
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from mnemosyne.bench.long_context.engine import random_prompt
from mnemosyne.bench.long_context.run import LONG_MAX_POSITIONS, SHAPES, write_model_dir
from mnemosyne.bench.long_context.synthetic_kv import SyntheticPrefillExecutor
from mnemosyne.config import ModelConfig
from mnemosyne.engine.args import EngineArgs
from mnemosyne.engine.llm_engine import LLMEngine
from mnemosyne.sampling_params import SamplingParams
from mnemosyne.worker import worker as worker_module

EXCLUDED = ("forward", "lm_head")  # device work on a GPU


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(float(x)) for x in s.split(",")]  # noqa: E731
    ap.add_argument("--batch-sizes", type=ints, default=[1, 16, 64])
    ap.add_argument("--contexts", type=ints, default=[1024, 32768, 200_000])
    ap.add_argument("--prompt-len", type=int, default=64, help="prompt of each request of the batch runs")
    ap.add_argument("--steps", type=int, default=200, help="measured decode steps per case")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny-llama")
    ap.add_argument(
        "--device", default="cpu", help="cpu, or cuda (the GPU: forward and LM head synchronized)"
    )
    ap.add_argument("--attention-backend", default="auto", help="auto: reference on CPU, kernels on CUDA")
    ap.add_argument("--profile", action="store_true", help="print a cProfile of the N=16 case and exit")
    ap.add_argument("--out", type=Path, default=None)
    return ap.parse_args(argv)


class PhaseTimer:
    """Seconds per phase, per step; wraps callables in place on instances (and restores them)."""

    def __init__(self, sync: Callable[[], None] | None = None) -> None:
        self.current: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []
        self.sync = sync  # CUDA: the excluded phases include the device work they wait for

    def timed(self, name: str, fn: Callable) -> Callable:
        current = self.current
        sync = self.sync if name in EXCLUDED else None

        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                if sync is not None:
                    sync()
                out = fn(*args, **kwargs)
                if sync is not None:
                    sync()
                return out
            finally:
                current[name] += time.perf_counter() - t0

        return wrapper

    def end_step(self) -> None:
        step = dict(self.current)
        step["host"] = step["step"] - sum(step.get(k, 0.0) for k in EXCLUDED)
        self.steps.append(step)
        self.current.clear()

    def summary(self) -> dict[str, dict[str, float]]:
        names = sorted({k for s in self.steps for k in s})
        out = {}
        for name in names:
            xs = [s.get(name, 0.0) * 1e6 for s in self.steps]
            out[name] = {"p50_us": statistics.median(xs), "mean_us": statistics.fmean(xs)}
        return out


@contextmanager
def _patched(patches: list[tuple[object, str, Callable]]) -> Iterator[None]:
    """Set each obj.attr to the wrapper for the duration (instances, or a module), then restore."""
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in patches]
    for obj, attr, wrapper in patches:
        setattr(obj, attr, wrapper)
    try:
        yield
    finally:
        for obj, attr, old in reversed(saved):
            setattr(obj, attr, old)


class _WrappedModel:
    """The worker's model with its forward and LM head wrapped (everything else delegated)."""

    def __init__(self, model, wrap: Callable[[str, Callable], Callable]) -> None:
        self._model = model
        self._forward = wrap("forward", model)
        self.compute_logits = wrap("lm_head", model.compute_logits)

    def __call__(self, *args, **kwargs):
        return self._forward(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._model, name)


def _device_patches(engine: LLMEngine, wrap: Callable[[str, Callable], Callable]) -> list:
    """The forward (eager, decode CUDA graphs, piecewise graphs) and the LM head, wrapped."""
    worker = engine.executor.worker
    patches = [(worker, "model", _WrappedModel(worker.model, wrap))]
    for graphs in (worker.graphs, worker.piecewise):
        if graphs is not None:
            patches.append((graphs, "run", wrap("forward", graphs.run)))
    return patches


def _paused(prof: cProfile.Profile) -> Callable[[str, Callable], Callable]:
    def wrap(name: str, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            prof.disable()
            try:
                return fn(*args, **kwargs)
            finally:
                prof.enable()

        return wrapper

    return wrap


def host_calls_per_step(engine: LLMEngine, num_steps: int) -> float:
    """Python and builtin calls per step outside the forward and the LM head (cProfile, paused
    around them): a count of host work that machine load and CPU caches do not change."""
    prof = cProfile.Profile()
    with _patched(_device_patches(engine, _paused(prof))):
        prof.enable()
        for _ in range(num_steps):
            engine.step()
        prof.disable()
    return pstats.Stats(prof).total_calls / num_steps


def instrumented(engine: LLMEngine, timer: PhaseTimer):  # -> context manager
    """Time the phases of `engine`'s steps (its instances only, plus the worker module's
    build_sub_batch for the duration)."""
    worker, t = engine.executor.worker, timer.timed
    return _patched(
        [
            (engine.scheduler, "schedule", t("schedule", engine.scheduler.schedule)),
            (engine, "predict_step", t("predict", engine.predict_step)),
            (engine.planner, "build", t("plan", engine.planner.build)),
            (engine, "_process", t("process", engine._process)),
            (engine.executor, "submit", t("execute", engine.executor.submit)),
            (worker, "sampler", t("sampler", worker.sampler)),
            (worker, "_sample", t("sample", worker._sample)),
            (worker_module, "build_sub_batch", t("sub_batch", worker_module.build_sub_batch)),
            *_device_patches(engine, t),
        ]
    )


def make_engine(model_dir: Path, ns: argparse.Namespace, max_num_seqs: int, kv_tokens: int) -> LLMEngine:
    dtype = EngineArgs(dtype="auto").resolve_dtype(ns.device)  # float32 on CPU, bfloat16 on CUDA
    kv_bytes = ModelConfig.from_pretrained(model_dir, dtype).kv_bytes_per_token
    args = EngineArgs(
        model=str(model_dir), load_format="dummy", dtype=str(dtype).removeprefix("torch."), device=ns.device,
        attention_backend=ns.attention_backend, block_size=16, chunk_size=1 << 18,
        max_num_batched_tokens=1 << 18, max_num_seqs=max_num_seqs,
        kv_cache_memory_gb=kv_tokens * kv_bytes / 2**30 + 0.01, generation_config="none",
        async_scheduling=False,  # phases of one step each (decode_synthetic_kv measures the overlap)
    )  # fmt: skip
    engine = LLMEngine.from_args(args)
    engine.executor = SyntheticPrefillExecutor(engine.executor)
    return engine


def measure(engine: LLMEngine, ns: argparse.Namespace) -> dict:
    """Warm-up, then --steps instrumented decode steps; every running request must be decoding."""
    for _ in range(ns.warmup):
        engine.step()
    timer = PhaseTimer(torch.cuda.synchronize if engine.config.device.startswith("cuda") else None)
    with instrumented(engine, timer):
        for _ in range(ns.steps):
            t0 = time.perf_counter()
            outs = engine.step()
            timer.current["step"] += time.perf_counter() - t0
            timer.end_step()
            if any(o.finished or len(o.delta_token_ids) != 1 for o in outs):
                raise RuntimeError("not every request decoded one token: raise max_tokens")
    calls = host_calls_per_step(engine, min(ns.steps, 20))
    return {
        "num_decodes": engine.scheduler.num_running,
        "host_calls_per_step": calls,
        "phases": timer.summary(),
    }


def _params(ns: argparse.Namespace) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=2 * (ns.warmup + ns.steps) + 64, ignore_eos=True)


def add_decoding(engine: LLMEngine, n: int, ns: argparse.Namespace) -> list[str]:
    """n requests of --prompt-len random tokens, stepped until all of them decode."""
    vocab = engine.config.model.vocab_size
    ids = [
        engine.add_request(random_prompt(ns.prompt_len, seed=i, max_id=vocab), _params(ns)) for i in range(n)
    ]
    while any(engine.scheduler.get_request(r).is_prefill for r in ids):
        engine.step()
    return ids


def run_batch(engine: LLMEngine, n: int, ns: argparse.Namespace) -> dict:
    ids = add_decoding(engine, n, ns)
    res = {"num_requests": n, "context": ns.prompt_len} | measure(engine, ns)
    for rid in ids:
        engine.abort(rid)
    return res


def run_context(engine: LLMEngine, ctx: int, ns: argparse.Namespace) -> dict:
    ex: SyntheticPrefillExecutor = engine.executor  # type: ignore[assignment]
    rid = f"long-{ctx}"
    ex.synthetic_ids.add(rid)
    engine.add_request(random_prompt(ctx, seed=ctx, max_id=engine.config.model.vocab_size), _params(ns), rid)
    req = engine.scheduler.get_request(rid)
    while req.is_prefill or req.num_output_tokens == 0:
        engine.step()
    ex.fill_synthetic_kv(rid, seed=ctx)
    res = {"num_requests": 1, "context": ctx, "kv_synthetic": True} | measure(engine, ns)
    engine.abort(rid)
    ex.synthetic_ids.discard(rid)
    return res


def profile(engine: LLMEngine, ns: argparse.Namespace) -> None:
    """cProfile of --steps steps of 16 decodes, paused in the forward and the LM head."""
    ids = add_decoding(engine, 16, ns)
    for _ in range(ns.warmup):
        engine.step()
    prof = cProfile.Profile()
    with _patched(_device_patches(engine, _paused(prof))):
        prof.runcall(lambda: [engine.step() for _ in range(ns.steps)])
    pstats.Stats(prof).sort_stats("tottime").print_stats(50)
    for rid in ids:
        engine.abort(rid)


def main(argv: list[str] | None = None) -> dict | None:
    argv = sys.argv[1:] if argv is None else argv
    ns = parse_args(argv)
    max_n = max(ns.batch_sizes)
    kv_tokens = max(max(ns.contexts, default=0), max_n * (ns.prompt_len + 2 * (ns.warmup + ns.steps) + 96))
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model_dir(ns.shape, Path(tmp), LONG_MAX_POSITIONS)
        engine = make_engine(model_dir, ns, max(max_n, 16), kv_tokens)
    on_cpu = engine.config.device == "cpu"
    if ns.profile:
        profile(engine, ns)
        return None
    result = {
        "benchmark": "host_overhead",
        "what": ("CPU HOST TIME" if on_cpu else "HOST TIME (GPU run: forward and LM head synchronized)")
        + " per decode step through LLMEngine.step, per phase, microseconds; "
        "host = step - forward - lm_head (device work on a GPU)." + (" Not GPU figures." if on_cpu else ""),
        "command": "python -m benchmarks.host_overhead " + shlex.join(argv),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": (
            f"CPU ({platform.processor() or platform.machine()})" if on_cpu else torch.cuda.get_device_name()
        )
        + f", torch {torch.__version__}, {torch.get_num_threads()} torch thread(s)",
        "shape": ns.shape,
        "dtype": str(engine.config.model.dtype),
        "attention_backend": ns.attention_backend,
        "batches": [],
        "contexts": [],
    }
    for n in ns.batch_sizes:
        result["batches"].append(run_batch(engine, n, ns))
        print(json.dumps(result["batches"][-1]), flush=True)
    for ctx in ns.contexts:
        result["contexts"].append(run_context(engine, ctx, ns))
        print(json.dumps(result["contexts"][-1]), flush=True)
    engine.shutdown()
    if ns.out is not None:
        ns.out.parent.mkdir(parents=True, exist_ok=True)
        ns.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    torch.set_num_threads(1)  # one core of a shared machine: less noise
    main()
