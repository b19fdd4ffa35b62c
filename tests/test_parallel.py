"""The 3D parallel runtime on CPU (gloo): every layout gives single-process results.

For each layout (one worker process per rank), against the single-process engine
on the same tiny float32 model: greedy tokens identical, prompt logprobs and
sampled-token logprobs within 1e-4. In every run
  * `max_tokens_per_kvp_group` is small, so the longest request spans every KVP group;
  * four requests of different lengths share steps (chunk 8, budget 32);
  * with spp > 1, at least 3 chunks of one prompt are in the pipeline at once;
  * with spp == 1, async scheduling is on: decode aheads run, and with KVP some on a
    group other than the one that sampled their input (a decode crossing a group end).
Worker processes cost a few seconds to start, so each layout starts once and
also serves the extra checks (torchrun launch, worker death) where it can.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest
import torch
from conftest import TEST_DEVICE
from tiny_models import COMMON as TINY_COMMON

from mnemosyne import LLM, ConfigError, SamplingParams
from mnemosyne.errors import WorkerError
from mnemosyne.wire.auth import SECRET_FILE_ENV

PROMPT_LENS = (37, 5, 64, 23)
NUM_NEW = 16
MAX_TOKENS = max(PROMPT_LENS) + NUM_NEW
BLOCK = 4
ATOL = 1e-4
ENGINE = dict(
    dtype="float32",
    device=TEST_DEVICE,
    chunk_size=8,
    max_num_batched_tokens=32,
    block_size=BLOCK,
    kv_cache_memory_gb=0.004,
    worker_timeout_s=60,
)
GREEDY = SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True, logprobs=1, prompt_logprobs=1)


def tokens_per_group(kvp: int) -> int:
    """T such that the longest request's KV (MAX_TOKENS - 1 tokens are written) needs all kvp groups."""
    t = -(-(MAX_TOKENS - 1) // kvp)
    return -(-t // BLOCK) * BLOCK


def make_prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, TINY_COMMON["vocab_size"], (n,), generator=g).tolist() for n in PROMPT_LENS]


@dataclass
class RunStats:
    max_groups: int = 0  # most KVP groups one request's KV spanned
    max_chunks_inflight: int = 0  # most chunks of one request in the pipeline at once
    max_requests_per_step: int = 0
    num_decode_aheads: int = 0  # async scheduling: chunks whose input the previous plan samples
    # ... whose KVP owner differs from the owner of the chunk that samples that input
    num_decode_aheads_on_a_new_group: int = 0
    outputs: list = field(default_factory=list)


def run(llm: LLM, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> RunStats:
    """Generate step by step, recording how the work was spread."""
    engine, stats = llm.engine, RunStats()
    submit = engine.executor.submit
    last_owner: dict[str, int] = {}  # request id -> KVP group owning its latest chunk

    def watching_submit(plan):
        inflight = Counter(c.request.request_id for s in engine.inflight for c in s.chunks)
        inflight.update(c.request_id for c in plan.chunks)
        stats.max_chunks_inflight = max(stats.max_chunks_inflight, max(inflight.values()))
        stats.max_requests_per_step = max(stats.max_requests_per_step, len(plan.chunks))
        for c in plan.chunks:
            if c.is_decode_ahead:
                stats.num_decode_aheads += 1
                stats.num_decode_aheads_on_a_new_group += last_owner[c.request_id] != c.owner_group
            last_owner[c.request_id] = c.owner_group
        submit(plan)

    engine.executor.submit = watching_submit
    plist = params if isinstance(params, list) else [params] * len(prompts)
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, plist, strict=True)]
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        for rid in ids:
            stats.max_groups = max(stats.max_groups, len(engine.kv_manager.pieces(rid)))
        engine.kv_manager.check_integrity()
    engine.executor.submit = submit
    stats.outputs = [done[i] for i in ids]
    return stats


def assert_same(ref: list, got: list, what: str) -> None:
    for r, g in zip(ref, got, strict=True):
        assert g.token_ids == r.token_ids, f"{what}: greedy tokens differ"
        for pos in range(1, len(r.prompt_token_ids)):
            tok = r.prompt_token_ids[pos]
            assert abs(g.prompt_logprobs[pos][tok] - r.prompt_logprobs[pos][tok]) < ATOL, f"{what}: plp {pos}"
        for tok, a, b in zip(r.token_ids, r.logprobs, g.logprobs, strict=True):
            assert abs(a[tok] - b[tok]) < ATOL, f"{what}: sampled-token logprob"


_REFS: dict[str, list] = {}


def reference(name: str, model_dir) -> list:
    if name not in _REFS:
        with LLM(model=str(model_dir), **ENGINE) as llm:
            _REFS[name] = run(llm, make_prompts(), GREEDY).outputs
    return _REFS[name]


# (test id, tiny model, layout). The models vary what each layout must shard: KV heads
# replicated over TP (llama3_scaled: 1 KV head), qkv bias (qwen2), q/k norm (qwen3), a
# sliding window across KVP groups (mistral_sliding), tied embeddings on another stage.
LAYOUTS = [
    ("tp2", "llama3_scaled", dict(tp=2)),
    ("spp2", "qwen2", dict(spp=2, pipeline_depth=3)),
    ("spp3", "llama", dict(spp=3)),
    ("kvp2", "mistral_sliding", dict(kvp=2)),
    ("kvp3", "qwen3", dict(kvp=3)),
    ("tp2xspp2", "llama_linear_tied", dict(tp=2, spp=2, pipeline_depth=3)),
    ("spp2xkvp2", "llama", dict(spp=2, kvp=2, pipeline_depth=3)),
    ("tp2xkvp2", "qwen2", dict(tp=2, kvp=2)),
    ("tp2xspp2xkvp2", "llama", dict(tp=2, spp=2, kvp=2, pipeline_depth=3)),
]


def skip_without_gpus(world: int) -> None:
    if TEST_DEVICE.startswith("cuda") and world > torch.cuda.device_count():
        pytest.skip(f"needs {world} GPUs")


def seeded_params(num_prompts: int) -> list[SamplingParams]:
    """Seeded random sampling, each request with logits processors that read its earlier
    tokens (kept on the reporting ranks while its KV moves between KVP groups)."""
    processors = [
        dict(repetition_penalty=1.5),
        dict(frequency_penalty=0.7, presence_penalty=0.4),
        dict(min_tokens=NUM_NEW // 2, logit_bias={5: 4.0}),
        dict(repetition_penalty=0.8, frequency_penalty=-0.5),
    ]
    return [
        SamplingParams(
            temperature=0.8, top_k=50, top_p=0.9, min_p=0.01, seed=7 + i, max_tokens=NUM_NEW, logprobs=2,
            **processors[i % len(processors)],
        )
        for i in range(num_prompts)
    ]  # fmt: skip


def assert_same_sampled(ref: list, got: list, what: str) -> None:
    for r, g in zip(ref, got, strict=True):
        assert g.token_ids == r.token_ids, f"{what}: sampled tokens differ"
        for tok, a, b in zip(r.token_ids, r.logprobs, g.logprobs, strict=True):
            assert abs(a[tok] - b[tok]) < ATOL, f"{what}: sampled-token logprob"


# Layouts that also run seeded sampling with penalties: async scheduling's decode-ahead
# inputs reach the token histories of every reporting rank, also of the group a request's
# decode moves to (kvp2: the 37-token prompt's decode crosses from group 0 to group 1 at
# position 40; kvp3: the 23-token prompt's at 28).
SEEDED_TOO = {"kvp2", "kvp3"}


@pytest.mark.parametrize("name,model,layout", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_layout_matches_single_process(name, model, layout, tiny_model_dir):
    skip_without_gpus(layout.get("tp", 1) * layout.get("spp", 1) * layout.get("kvp", 1))
    model_dir = tiny_model_dir(model)
    ref = reference(model, model_dir)
    kvp, spp = layout.get("kvp", 1), layout.get("spp", 1)
    extra = {"max_tokens_per_kvp_group": tokens_per_group(kvp)} if kvp > 1 else {}
    with LLM(model=str(model_dir), **ENGINE, **layout, **extra) as llm:
        # Async scheduling for every layout without stages (decode aheads across processes).
        assert llm.engine.config.scheduler.async_scheduling is (spp == 1)
        stats = run(llm, make_prompts(), GREEDY)
        seeded = run(llm, make_prompts(), seeded_params(len(PROMPT_LENS))) if name in SEEDED_TOO else None
    assert_same(ref, stats.outputs, name)
    assert stats.max_groups == kvp, f"the longest request spans {stats.max_groups} of {kvp} KVP groups"
    assert stats.max_requests_per_step >= 3
    if spp > 1:
        assert stats.max_chunks_inflight >= 3
        assert stats.num_decode_aheads == 0
    else:
        assert stats.num_decode_aheads > 0
    if spp == 1 and kvp > 1:  # a decode crosses a group boundary: the sampler and the next owner differ
        assert stats.num_decode_aheads_on_a_new_group > 0
    if seeded is not None:
        with LLM(model=str(model_dir), **ENGINE) as llm:
            seeded_ref = run(llm, make_prompts(), seeded_params(len(PROMPT_LENS))).outputs
        assert_same_sampled(seeded_ref, seeded.outputs, f"{name} seeded")


def test_preemption_and_seeded_sampling_across_layouts(tiny_model_dir):
    """spp=2 x kvp=2 with a KV cache too small for all requests at once: preemption and
    recompute; seeded random sampling with penalties gives the single-process tokens (seeds
    depend only on (seed, position), never on the layout or on preemption)."""
    skip_without_gpus(4)
    model_dir = tiny_model_dir("llama")
    prompts = make_prompts()
    # The logits processors' token histories are also recomputed after preemption.
    params = seeded_params(len(prompts))
    # KV for 40 blocks on one device (768 B/token); 20 blocks per group on spp=2 (512 B/token).
    single = dict(ENGINE, kv_cache_memory_gb=40 * BLOCK * 768 / 2**30, max_num_batched_tokens=64)
    with LLM(model=str(model_dir), **single) as llm:
        ref = run(llm, prompts, params).outputs
    layout = dict(spp=2, kvp=2, max_tokens_per_kvp_group=tokens_per_group(2))
    with LLM(
        model=str(model_dir), **dict(single, kv_cache_memory_gb=20 * BLOCK * 512 / 2**30), **layout
    ) as llm:
        stats = run(llm, prompts, params)
        assert llm.engine.scheduler.num_preemptions > 0, "the test meant to force preemption"
    assert_same_sampled(ref, stats.outputs, "spp2xkvp2 preempted")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_workers_and_worker_death(tiny_model_dir, tmp_path, monkeypatch):
    """Workers started by torchrun (env:// rendezvous, the control secret in a 0600 file)
    serve a driver bound to a fixed address; when one of them is killed, the engine
    raises instead of hanging."""
    model_dir = tiny_model_dir("llama")
    ref = reference("llama", model_dir)
    address = f"tcp://127.0.0.1:{_free_port()}"
    secret_file = tmp_path / "secret"
    secret_file.write_text(secrets.token_hex(32))
    secret_file.chmod(0o600)
    monkeypatch.setenv(SECRET_FILE_ENV, str(secret_file))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "mnemosyne.worker", "--driver", address]
    torchrun = subprocess.Popen(cmd, start_new_session=True)
    try:
        with LLM(model=str(model_dir), **ENGINE, tp=2, driver_address=address) as llm:
            assert_same(ref, run(llm, make_prompts(), GREEDY).outputs, "torchrun tp2")
            workers = _children(torchrun.pid)
            assert len(workers) == 2, workers
            os.kill(workers[-1], signal.SIGKILL)
            llm.engine.add_request(make_prompts()[0], GREEDY)
            t0 = time.monotonic()
            with pytest.raises(WorkerError, match="worker"):
                while llm.engine.has_unfinished_requests():
                    llm.engine.step()
            assert time.monotonic() - t0 < 60
            with pytest.raises(WorkerError, match="stopped"):
                llm.engine.step()
    finally:
        os.killpg(torchrun.pid, signal.SIGKILL)
        torchrun.wait()


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return sorted(int(x) for x in out.split())


def test_abort_in_flight_then_local_worker_death_raises(tiny_model_dir):
    """spp=2, depth 3: aborting a prompt with chunks in the pipeline frees its blocks and
    spares the others; then a killed stage makes the engine raise, naming the rank."""
    model_dir = tiny_model_dir("llama")
    ref = reference("llama", model_dir)
    prompts = make_prompts()
    with LLM(model=str(model_dir), **ENGINE, spp=2, pipeline_depth=3) as llm:
        engine = llm.engine
        ids = [engine.add_request(p, GREEDY) for p in prompts]
        engine.step()
        victim = ids[2]  # the 64-token prompt: still prefilling, chunks in flight
        assert any(c.request.request_id == victim for s in engine.inflight for c in s.chunks)
        engine.abort(victim)
        assert not engine.kv_manager.has_request(victim)
        done = {}
        while engine.has_unfinished_requests():
            done.update({o.request_id: o for o in engine.step() if o.finished})
        engine.kv_manager.check_integrity()
        assert engine.kv_manager.num_free_blocks_total == sum(engine.config.cache.num_blocks_per_group)
        assert victim not in done
        for i in (0, 1, 3):
            assert done[ids[i]].token_ids == ref[i].token_ids

        llm.engine.executor.local.procs[1].kill()
        llm.engine.add_request(make_prompts()[2], GREEDY)
        with pytest.raises(WorkerError, match="rank 1"):
            while llm.engine.has_unfinished_requests():
                llm.engine.step()


@pytest.mark.parametrize(
    "layout,match",
    [
        (dict(tp=3), "num_heads"),
        (dict(spp=4), "spp"),
        (dict(tp=0), "tp must be >= 1"),
    ],
)
def test_bad_layouts_fail_before_any_worker_starts(layout, match, tiny_model_dir):
    with pytest.raises(ConfigError, match=match):
        LLM(model=str(tiny_model_dir("llama")), **ENGINE, **layout)


def test_engine_config_of_a_layout(tiny_model_dir):
    """Per-device KV sizing: the longest stage's layers and one TP rank's KV heads; every
    KVP group gets the same pool, and T defaults to one group's whole capacity."""
    from mnemosyne import EngineArgs

    model_dir = str(tiny_model_dir("llama"))  # 3 layers, 2 KV heads of 16 dims, float32
    gb = 0.001
    cfg = EngineArgs(
        model=model_dir,
        dtype="float32",
        device="cpu",
        block_size=4,
        kv_cache_memory_gb=gb,
        tp=2,
        spp=2,
        kvp=3,
    ).create_engine_config()
    per_token = 2 * 2 * 1 * 16 * 4  # K and V, 2 layers on stage 0, 1 KV head per TP rank, fp32
    num_blocks = int(gb * 2**30 // (4 * per_token))
    assert cfg.cache.num_blocks_per_group == (num_blocks,) * 3
    assert cfg.cache.max_tokens_per_kvp_group == num_blocks * 4
    assert cfg.parallel.world_size == 12 and cfg.parallel.max_inflight == 2

    # One KVP count: a cache with a pool per group disagreeing with the layout is refused.
    import dataclasses

    from mnemosyne.errors import ConfigError

    with pytest.raises(ConfigError, match="2 group pools, the layout kvp=3"):
        dataclasses.replace(cfg, cache=dataclasses.replace(cfg.cache, num_blocks_per_group=(num_blocks,) * 2))
