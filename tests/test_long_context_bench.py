"""The long-context benchmarks on CPU: the decode sweep stays inside the CUDA graphs' block
table, and the synthetic-KV decode mode keeps the engine's state exact (issue 19)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from mnemosyne import SamplingParams
from mnemosyne.bench.long_context.engine import check_graph_fits, decode_contexts, synthetic_meta
from mnemosyne.bench.long_context.synthetic_kv import SyntheticPrefillExecutor, skip_prefill_compute
from mnemosyne.engine.args import DEFAULT_BLOCK_SIZE, EngineArgs
from mnemosyne.engine.llm_engine import LLMEngine
from mnemosyne.wire.plan import ChunkPlan, PiecePlan
from mnemosyne.worker.cuda_graph import DecodeGraphs


def _cpu_graphs(max_blocks: int, block_size: int) -> DecodeGraphs:
    """The graphs' static buffers on CPU (no capture: `run` fails before it if the table is too wide)."""
    cfg = SimpleNamespace(sliding_window=None, hidden_size=8, dtype=torch.float32)
    model = SimpleNamespace(config=cfg, num_local_kv_heads=1, is_first_stage=True)
    return DecodeGraphs(model, [], None, 1, max_blocks, block_size, torch.device("cpu"))  # type: ignore[arg-type]


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
