"""The long-context benchmarks on CPU: the decode sweep stays inside the CUDA graphs' block
table, and the synthetic-KV decode mode keeps the engine's state exact (issue 19)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from mnemosyne import SamplingParams
from mnemosyne.bench.long_context.engine import (
    check_graph_fits,
    decode_contexts,
    sequences_meta,
    synthetic_meta,
)
from mnemosyne.bench.long_context.synthetic_kv import SyntheticPrefillExecutor, skip_prefill_compute
from mnemosyne.engine.args import DEFAULT_BLOCK_SIZE, EngineArgs
from mnemosyne.engine.llm_engine import LLMEngine
from mnemosyne.outputs import RequestOutput
from mnemosyne.wire.plan import ChunkPlan, PiecePlan
from mnemosyne.worker.cuda_graph import DecodeGraphs


def _cpu_graphs(max_blocks: int, block_size: int) -> DecodeGraphs:
    """The graphs' static buffers on CPU (no capture: `run` fails before it if the table is too wide)."""
    cfg = SimpleNamespace(sliding_window=None, hidden_size=8, dtype=torch.float32)
    model = SimpleNamespace(config=cfg, num_local_kv_heads=1, is_first_stage=True)
    return DecodeGraphs(model, [], None, 1, max_blocks, block_size, torch.device("cpu"))  # type: ignore[arg-type]


def test_sequences_meta_lays_each_sequence_on_its_own_run() -> None:
    """Each sequence's slots are its block table's (slot = table[j // B] * B + j % B), its
    blocks follow the sequence before it, and its run is its whole table."""
    bs, seqs = 16, [(1, 40), (7, 0), (3, 33)]
    meta = sequences_meta(seqs, bs, device="cpu")
    tables = [t[: -(-(q + p) // bs)].tolist() for t, (q, p) in zip(meta.block_tables, seqs, strict=True)]
    assert tables == [[0, 1, 2], [3], [4, 5, 6]]
    want = [t[j // bs] * bs + j % bs for t, (q, p) in zip(tables, seqs, strict=True) for j in range(p, p + q)]
    assert meta.slot_mapping.tolist() == want
    assert meta.block_runs_cpu == [(0, 3), (3, 1), (4, 3)]
    one = synthetic_meta(5, 40, bs, device="cpu")
    assert one.slot_mapping.tolist() == list(range(40, 45)) and one.block_runs_cpu == [(0, 3)]


def test_decode_sweep_stays_inside_the_graph_block_table() -> None:
    bs, max_model_len = 16, 1000
    graphs = _cpu_graphs(-(-max_model_len // bs), bs)  # as DecodeGraphs.create sizes it
    # The old sweep went up to the KV capacity: a decode past max_model_len crashed in run().
    too_long = synthetic_meta(1, 4000, bs, device="cpu")
    with pytest.raises(RuntimeError):
        graphs.run(torch.ones(1, dtype=torch.long), torch.tensor([4000]), too_long)
    with pytest.raises(ValueError, match="raise max_model_len"):
        check_graph_fits(graphs, too_long)
    ctxs = decode_contexts(capacity=10_000, max_model_len=max_model_len, chunk=64, block_size=bs)
    assert ctxs == [max_model_len - 1]
    for ctx in ctxs:
        check_graph_fits(graphs, synthetic_meta(1, ctx, bs, device="cpu"))
    big = decode_contexts(capacity=1 << 20, max_model_len=1 << 24, chunk=8192, block_size=bs)
    assert big[-1] == (1 << 20) - 8192 - bs and 1 << 15 in big


def test_skip_prefill_compute_keeps_the_pieces() -> None:
    piece = PiecePlan(0, 0, 40, 0, tuple(range(10)))
    chunk = ChunkPlan("r", 16, 24, True, tuple(range(16, 40)), (piece,), 16, (1, 2))
    short = skip_prefill_compute(chunk)
    assert (short.start, short.num_tokens, short.end, short.token_ids) == (39, 1, 40, (39,))
    assert short.pieces == chunk.pieces and short.sample and short.prompt_logprob_targets == ()
    assert skip_prefill_compute(short) is short


def test_synthetic_prefill_with_true_kv_is_exact(tiny_model_dir) -> None:
    """Skipping a prompt's prefill compute and writing the true K/V into the blocks the KV
    manager allocated gives the same next tokens as a real prefill: the blocks, positions and
    mirrors of the synthetic mode are the engine's own. Synchronous steps: the true K/V are
    written once the prefill's token is seen, and with async scheduling the first decode
    would already have run over the unwritten blocks."""
    args = EngineArgs(model=str(tiny_model_dir("llama3_scaled")), device="cpu", dtype="float32",
                      block_size=4, chunk_size=16, max_num_batched_tokens=16, kv_cache_memory_gb=0.01,
                      enable_prefix_caching=False, async_scheduling=False)  # fmt: skip
    engine = LLMEngine.from_args(args)
    ex = engine.executor = SyntheticPrefillExecutor(engine.executor)
    caches = ex.worker.kv_caches
    prompt = torch.randint(3, 300, (53,), generator=torch.Generator().manual_seed(0)).tolist()
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)

    def prefill(rid: str) -> list[int]:
        engine.add_request(prompt, greedy, request_id=rid)
        req = engine.scheduler.get_request(rid)
        while req.num_output_tokens == 0:
            engine.step()
        return [b for p in engine.kv_manager.pieces(rid) for b in p.block_ids]

    true_blocks = prefill("real")
    true_kv = [(k[true_blocks].clone(), v[true_blocks].clone()) for k, v in caches]
    engine.abort("real")

    ex.synthetic_ids.add("synthetic")
    blocks = prefill("synthetic")
    assert ex.num_skipped_tokens == 53 - 4  # 4 chunks of 16, 16, 16, 5 tokens: one computed each
    assert len(blocks) == len(true_blocks)
    for (k, v), (tk, tv) in zip(caches, true_kv, strict=True):
        k[blocks], v[blocks] = tk, tv
    out = None
    while engine.has_unfinished_requests():
        out = next((o for o in engine.step() if o.request_id == "synthetic"), out)
    first, rest = out.token_ids[0], out.token_ids[1:]

    reference = engine.add_request(
        [*prompt, first], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    )
    ref = None
    while engine.has_unfinished_requests():
        ref = next((o for o in engine.step() if o.request_id == reference), ref)
    assert rest == ref.token_ids
    engine.shutdown()


def test_decode_synthetic_kv_cpu_smoke(tmp_path) -> None:
    from benchmarks.decode_synthetic_kv import main

    out = tmp_path / "d.json"
    main(["--shape", "tiny-llama", "--device", "cpu", "--contexts", "200,300", "--steps", "3", "--warmup", "1",
          "--num-short", "2", "--short-prompt", "8", "--prefill-chunk", "64", "--out", str(out)])  # fmt: skip
    res = json.loads(out.read_text())
    assert "SYNTHETIC" in res["kv"] and res["command"].startswith("python -m benchmarks.decode_synthetic_kv")
    assert [r["ctx"] for r in res["results"]] == [200, 300]
    for r in res["results"]:
        assert r["kv_synthetic"] and r["num_blocks"] == -(-r["ctx"] // DEFAULT_BLOCK_SIZE)
        assert r["alone"]["num_decodes"] == 1 and r["with_short"]["num_decodes"] == 3
        assert r["alone"]["tbt_p50_s"] > 0 and r["floor_s"] > 0 and r["with_short"]["short_tbt_p50_s"] > 0
        assert r["prefill_tokens_skipped"] == r["ctx"] - -(-r["ctx"] // 64)  # one token per chunk of 64


def _step_until_decoding(engine: LLMEngine, request_ids: list[str]) -> None:
    while any(engine.scheduler.get_request(r).num_output_tokens == 0 for r in request_ids):
        engine.step()


def test_fill_synthetic_kv_writes_only_the_request_blocks(tiny_model_dir) -> None:
    """In process: N(0, 1) in every block of the request (every layer, K and V), the same
    values again for the same seed, every other block untouched; no blocks, no writes."""
    args = EngineArgs(model=str(tiny_model_dir("llama")), device="cpu", dtype="float32", block_size=4,
                      chunk_size=16, max_num_batched_tokens=32, kv_cache_memory_gb=0.01,
                      enable_prefix_caching=False, async_scheduling=False)  # fmt: skip
    engine = LLMEngine.from_args(args)
    ex = engine.executor = SyntheticPrefillExecutor(engine.executor)
    ex.synthetic_ids.add("s")
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    engine.add_request(list(range(3, 40)), params, request_id="a")
    engine.add_request(list(range(3, 50)), params, request_id="s")
    _step_until_decoding(engine, ["a", "s"])
    caches = ex.worker.kv_caches
    before = [[c.clone() for c in layer] for layer in caches]
    blocks = [b for p in engine.kv_manager.pieces("s") for b in p.block_ids]
    others = torch.ones(caches[0][0].shape[0], dtype=torch.bool)
    others[blocks] = False

    (filled,) = ex.fill_synthetic_kv("s", seed=7)
    assert (filled.rank, filled.group, filled.num_blocks) == (0, 0, len(blocks)) and len(blocks) == 12
    assert filled.num_bytes == len(blocks) * 4 * engine.config.model.kv_bytes_per_token
    assert 0.5 < filled.mean_square < 2.0
    for layer, old in zip(caches, before, strict=True):
        for cache, prev in zip(layer, old, strict=True):
            assert (cache[blocks] != 0).all() and not torch.equal(cache[blocks], prev[blocks])
            assert torch.equal(cache[others], prev[others])
    first = [[c[blocks].clone() for c in layer] for layer in caches]
    ex.fill_synthetic_kv("s", seed=7)
    assert all(torch.equal(c[blocks], f) for layer, fl in zip(caches, first) for c, f in zip(layer, fl))
    assert ex.fill_synthetic_kv("unknown", seed=7)[0].num_blocks == 0
    engine.shutdown()


def test_synthetic_kv_on_kvp2_worker_processes(tmp_path) -> None:
    """kvp=2 worker processes (gloo), one spawn, the benchmark's own engine:
    * a synthetic request spanning both groups: after the fill, each rank reports exactly
      the blocks the KV manager gave its group, read back as unit-variance noise;
    * a real request decoding beside it gives the single-process engine's tokens and
      logprobs (its blocks were not touched);
    * then the benchmark's whole measurement on the same engine (its CPU smoke with --kvp 2)."""
    from benchmarks.decode_synthetic_kv import make_engine, measure_all, parse_args
    from mnemosyne.bench.long_context.engine import random_prompt
    from mnemosyne.bench.long_context.run import LONG_MAX_POSITIONS, write_model_dir

    argv = ["--shape", "tiny-llama", "--device", "cpu", "--contexts", "300", "--steps", "3", "--warmup", "1",
            "--num-short", "2", "--short-prompt", "8", "--prefill-chunk", "64"]  # fmt: skip
    model_dir = write_model_dir("tiny-llama", tmp_path, LONG_MAX_POSITIONS)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=1)
    prompt = random_prompt(40, seed=3, max_id=512)

    def generate(engine: LLMEngine, synthetic_len: int) -> tuple[list, RequestOutput]:
        """Request "a" decodes; with synthetic_len, "s" is added, prefilled, filled, then "a" ends."""
        ex = engine.executor
        engine.add_request(prompt, params, request_id="a")
        _step_until_decoding(engine, ["a"])
        filled = []
        if synthetic_len:
            ex.synthetic_ids.add("s")
            engine.add_request(
                [1] * synthetic_len, SamplingParams(temperature=0, max_tokens=64), request_id="s"
            )
            _step_until_decoding(engine, ["s"])
            assert engine.scheduler.get_request("a") is not None  # still decoding beside it
            filled = ex.fill_synthetic_kv("s", seed=5)
            blocks_by_group = {p.group: len(p.block_ids) for p in engine.kv_manager.pieces("s")}
            assert [(f.rank, f.group) for f in filled] == [(0, 0), (1, 1)]
            assert {f.group: f.num_blocks for f in filled} == blocks_by_group and sorted(
                blocks_by_group.values()
            ) == [2, 3]
        out = None
        while out is None:
            out = next((o for o in engine.step() if o.request_id == "a" and o.finished), None)
        if synthetic_len:
            engine.abort("s")
            ex.synthetic_ids.discard("s")
        return filled, out

    reference_engine = make_engine(model_dir, parse_args(argv))
    try:
        _, ref = generate(reference_engine, 0)
    finally:
        reference_engine.shutdown()

    engine = make_engine(model_dir, parse_args([*argv, "--kvp", "2"]))
    try:
        assert engine.config.cache.max_tokens_per_kvp_group == 192  # ceil((300 + 32) / 2), to a block
        filled, got = generate(engine, 300)
        assert all(0.5 < f.mean_square < 2.0 for f in filled)  # both ranks wrote their blocks
        assert got.token_ids == ref.token_ids
        for tok, a, b in zip(ref.token_ids, ref.logprobs, got.logprobs, strict=True):
            assert abs(a[tok] - b[tok]) < 1e-4

        res = measure_all(engine, parse_args([*argv, "--kvp", "2"]), [*argv, "--kvp", "2"], {}, 0.0)
    finally:
        engine.shutdown()
    assert res["layout"] == {"tp": 1, "spp": 1, "kvp": 2, "world_size": 2}
    assert res["executor"] == "worker processes" and res["forward_gpu_timing"].startswith("unavailable")
    (r,) = res["results"]
    assert sorted(r["kv_tokens_by_group"]) == [108, 192] and r["num_blocks"] == 5  # blocks of 64
    assert sorted(f["num_blocks"] for f in r["fill_by_rank"]) == [2, 3]
    assert r["floor_s"] == pytest.approx((res["weight_bytes"] + 192 * res["kv_bytes_per_token"]) / 4.2e12)
    for phase in ("alone", "with_short"):
        assert r[phase]["tbt_p50_s"] > 0 and "forward_gpu_p50_s" not in r[phase]
    assert r["with_short"]["num_decodes"] == 3
