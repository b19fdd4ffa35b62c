"""Tensor parallelism and pipeline-stage slicing: sharded == unsharded, on CPU with gloo.

Multi-process checks run in two spawns (2 ranks: tp=2; 4 ranks: tp=4 and tp=2 x spp=2).
Each rank runs every check of its spawn, compares its sharded result with the unsharded
one it computes itself, and writes {check name: max abs error} to a file; the tests
below read those numbers. A failing rank re-raises here with its traceback; a hung
spawn is killed after `SPAWN_TIMEOUT_S`.
"""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mnemosyne.config import ModelConfig, ParallelConfig
from mnemosyne.errors import ConfigError
from mnemosyne.layers.attention.metadata import AttentionMetadata
from mnemosyne.layers.attention.reference import TorchReferenceBackend
from mnemosyne.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from mnemosyne.layers.vocab_parallel import ParallelLMHead, VocabParallelEmbedding
from mnemosyne.models.llama import LlamaForCausalLM
from mnemosyne.models.loader import load_model
from mnemosyne.parallel.comm import recv_from_stage, send_to_stage
from mnemosyne.parallel.groups import GroupHandle, ProcessGroups, RankCoords
from mnemosyne.parallel.validate import check_layout

SPAWN_TIMEOUT_S = 120.0
LINEAR_ATOL = 1e-5
MODEL_ATOL = 1e-4
BLOCK_SIZE = 4
TP2_MODELS = ("llama", "qwen2", "qwen3", "llama_linear_tied")
TP4_MODELS = ("llama", "llama3_scaled")  # 2 and 1 KV heads: replicated over 4 ranks
TP2_SPP2_MODELS = ("llama", "llama_linear_tied")  # tied: the last stage holds its own head copy
Errors = dict[str, float]


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return (a.double() - b.double()).abs().max().item()


# ---- layer checks (run on every rank of a TP group) ----------------------------------------


def _check_linears(tp: GroupHandle) -> Errors:
    errs: Errors = {}
    g = torch.Generator().manual_seed(0)

    def weight(out_features: int, in_features: int) -> torch.Tensor:  # outputs of order 1
        return torch.randn(out_features, in_features, generator=g) * in_features**-0.5

    t, n = tp.rank_in_group, tp.size
    hidden, head_dim, num_tokens = 32, 8, 5
    x = torch.randn(num_tokens, hidden, generator=g)
    for num_heads, num_kv_heads in ((8, 2), (8, 1), (4, 4)):
        wq, wk, wv = (weight(h * head_dim, hidden) for h in (num_heads, num_kv_heads, num_kv_heads))
        bq, bk, bv = (torch.randn(w.shape[0], generator=g) for w in (wq, wk, wv))
        layer = QKVParallelLinear(hidden, head_dim, num_heads, num_kv_heads, True, torch.float32, tp)
        for shard, (w, b) in enumerate(((wq, bq), (wk, bk), (wv, bv))):
            layer.load_shard(shard, "weight", w)
            layer.load_shard(shard, "bias", b)
        q, k, v = layer(x).split(layer.local_sizes, dim=-1)
        hq = num_heads // n  # q heads per rank; the KV head each one reads (GQA) defines the expected k/v
        kv_heads = sorted({h // (num_heads // num_kv_heads) for h in range(t * hq, (t + 1) * hq)})
        rows = [r for h in kv_heads for r in range(h * head_dim, (h + 1) * head_dim)]
        tag = f"qkv_h{num_heads}_kv{num_kv_heads}"
        errs[f"{tag}_q"] = _err(q, F.linear(x, wq, bq)[:, t * hq * head_dim : (t + 1) * hq * head_dim])
        errs[f"{tag}_k"] = _err(k, F.linear(x, wk, bk)[:, rows])
        errs[f"{tag}_v"] = _err(v, F.linear(x, wv, bv)[:, rows])

    # gate|up (column) -> down (row): the MLP, and each piece on its own.
    inter = 24
    w_gate, w_up = weight(inter, hidden), weight(inter, hidden)
    w_down, b_down = weight(hidden, inter), torch.randn(hidden, generator=g)
    gate_up = MergedColumnParallelLinear(hidden, [inter, inter], False, torch.float32, tp)
    gate_up.load_shard(0, "weight", w_gate)
    gate_up.load_shard(1, "weight", w_up)
    down = RowParallelLinear(inter, hidden, True, torch.float32, tp)
    down.load("weight", w_down)
    down.load("bias", b_down)
    cols = slice(t * inter // n, (t + 1) * inter // n)
    gate, up = gate_up(x).chunk(2, dim=-1)
    errs["merged_column"] = _err(
        torch.cat([gate, up], -1), torch.cat([x @ w_gate[cols].T, x @ w_up[cols].T], -1)
    )
    h_full = F.silu(x @ w_gate.T) * (x @ w_up.T)
    errs["row_bias"] = _err(down(h_full[:, cols]), F.linear(h_full, w_down, b_down))
    errs["mlp"] = _err(down(F.silu(gate) * up), F.linear(h_full, w_down, b_down))

    w, b = weight(16, hidden), torch.randn(16, generator=g)
    col = ColumnParallelLinear(hidden, 16, True, torch.float32, tp)
    col.load("weight", w)
    col.load("bias", b)
    errs["column_bias"] = _err(col(x), F.linear(x, w, b)[:, t * 16 // n : (t + 1) * 16 // n])
    return errs


def _check_vocab(tp: GroupHandle) -> Errors:
    errs: Errors = {}
    g = torch.Generator().manual_seed(1)
    for vocab in (37, 40):  # 37: padded to a multiple of tp
        hidden = 16
        emb_w, head_w = torch.randn(vocab, hidden, generator=g), torch.randn(vocab, hidden, generator=g)
        ids = torch.cat([torch.arange(vocab), torch.randint(0, vocab, (11,), generator=g)])
        emb = VocabParallelEmbedding(vocab, hidden, torch.float32, tp)
        emb.load_weight(emb_w)
        errs[f"embedding_v{vocab}"] = _err(emb(ids), F.embedding(ids, emb_w))
        h = torch.randn(6, hidden, generator=g)
        head = ParallelLMHead(vocab, hidden, torch.float32, tp)
        head.load_weight(head_w)
        errs[f"lm_head_v{vocab}"] = _err(head.compute_logits(h), F.linear(h, head_w))
        tied = ParallelLMHead(vocab, hidden, torch.float32, tp, tied_to=emb)
        errs[f"lm_head_tied_v{vocab}"] = _err(tied.compute_logits(h), F.linear(h, emb_w))
    return errs


# ---- whole-model checks ------------------------------------------------------------------


def _steps(vocab: int) -> list[tuple[torch.Tensor, torch.Tensor, AttentionMetadata]]:
    """Two sequences: a prefill of both (13 and 9 tokens), then one decode of each."""
    g = torch.Generator().manual_seed(2)
    tables = [[0, 1, 2, 3], [4, 5, 6]]
    out = []
    for starts, lens in (((0, 0), (13, 9)), ((13, 9), (1, 1))):
        pos = [p for s, n in zip(starts, lens) for p in range(s, s + n)]
        slots = [
            tables[i][p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE
            for i in range(2)
            for p in range(starts[i], starts[i] + lens[i])
        ]
        meta = AttentionMetadata.build(
            query_lens=list(lens),
            q_pos_start=list(starts),
            kv_start=[0, 0],
            kv_lens=[s + n for s, n in zip(starts, lens)],
            block_tables=tables,
            slot_mapping=slots,
            device="cpu",
        )
        ids = torch.randint(3, vocab, (len(pos),), generator=g)
        out.append((ids, torch.tensor(pos), meta))
    return out


@torch.inference_mode()
def _run_model(model: LlamaForCausalLM, pg: ProcessGroups) -> torch.Tensor | None:
    """Every step through `model` (sending/receiving hidden states between stages);
    the logits of all rows, on the last stage."""
    cfg = model.config
    shape = (8, BLOCK_SIZE, model.num_local_kv_heads, cfg.head_dim)
    caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(model.num_local_layers)]
    logits = []
    for ids, pos, meta in _steps(cfg.vocab_size):
        x = ids
        if not model.is_first_stage:
            assert pg.prev_stage_rank is not None
            x = recv_from_stage(
                (len(ids), cfg.hidden_size), torch.float32, torch.device("cpu"), pg.prev_stage_rank
            )
        h = model(x, pos, caches, meta)
        if model.is_last_stage:
            logits.append(model.compute_logits(h))
        else:
            assert pg.next_stage_rank is not None
            work = send_to_stage(h, pg.next_stage_rank)
            if work is not None:
                work.wait()
    return torch.cat(logits) if logits else None


def _check_model(pg: ProcessGroups, model_dir: Path, tag: str) -> Errors:
    cfg = ModelConfig.from_pretrained(model_dir, torch.float32)
    want = _run_model(load_model(model_dir, cfg, TorchReferenceBackend(), "cpu"), ProcessGroups.single())
    got = _run_model(load_model(model_dir, cfg, TorchReferenceBackend(), "cpu", pg), pg)
    assert want is not None
    return {} if got is None else {tag: _err(got, want)}


# ---- spawned workers ---------------------------------------------------------------------


def _worker(rank: int, world_size: int, init_file: str, out_dir: str, model_dirs: dict[str, str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    errs: Errors = {}
    layouts = [ParallelConfig(tp=world_size)] + ([ParallelConfig(tp=2, spp=2)] if world_size == 4 else [])
    pgs = [ProcessGroups.create(p, rank) for p in layouts]  # collective: every rank, same order
    tp_pg = pgs[0]
    errs.update({f"tp{world_size}_{k}": v for k, v in _check_linears(tp_pg.tp).items()})
    errs.update({f"tp{world_size}_{k}": v for k, v in _check_vocab(tp_pg.tp).items()})
    for name in TP2_MODELS if world_size == 2 else TP4_MODELS:
        errs.update(_check_model(tp_pg, Path(model_dirs[name]), f"tp{world_size}_model_{name}"))
    if world_size == 4:
        for name in TP2_SPP2_MODELS:
            errs.update(_check_model(pgs[1], Path(model_dirs[name]), f"tp2_spp2_model_{name}"))
    torch.save(errs, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _spawn(world_size: int, tmp: Path, model_dirs: dict[str, str]) -> Errors:
    ctx = mp.start_processes(
        _worker,
        args=(world_size, str(tmp / "rendezvous"), str(tmp), model_dirs),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world_size}-rank spawn did not finish in {SPAWN_TIMEOUT_S} s")
    merged: Errors = {}
    for rank in range(world_size):
        for k, v in torch.load(tmp / f"rank{rank}.pt").items():
            merged[k] = max(v, merged.get(k, 0.0))
    return merged


@pytest.fixture(scope="module")
def tp2_errors(tiny_model_dir, tmp_path_factory) -> Errors:
    return _spawn(2, tmp_path_factory.mktemp("tp2"), {n: str(tiny_model_dir(n)) for n in TP2_MODELS})


@pytest.fixture(scope="module")
def tp4_errors(tiny_model_dir, tmp_path_factory) -> Errors:
    names = set(TP4_MODELS) | set(TP2_SPP2_MODELS)
    return _spawn(4, tmp_path_factory.mktemp("tp4"), {n: str(tiny_model_dir(n)) for n in names})


def _assert_small(errs: Errors, prefix: str, atol: float, expected_count: int) -> None:
    picked = {k: v for k, v in errs.items() if k.startswith(prefix)}
    assert len(picked) == expected_count, f"checks {sorted(picked)} for {prefix!r}"
    bad = {k: v for k, v in picked.items() if not v <= atol}
    assert not bad, f"sharded != unsharded (max abs error): {bad}"


NUM_LINEAR_CHECKS = 3 * 3 + 4
NUM_VOCAB_CHECKS = 2 * 3


@pytest.mark.parametrize("tp", [2, 4])
def test_parallel_linears_match_full(tp, request):
    errs = request.getfixturevalue(f"tp{tp}_errors")
    linear = {
        k: v for k, v in errs.items() if "embedding" not in k and "lm_head" not in k and "model" not in k
    }
    _assert_small(linear, f"tp{tp}_", LINEAR_ATOL, NUM_LINEAR_CHECKS)


@pytest.mark.parametrize("tp", [2, 4])
def test_vocab_parallel_match_full(tp, request):
    errs = request.getfixturevalue(f"tp{tp}_errors")
    vocab = {k: v for k, v in errs.items() if "embedding" in k or "lm_head" in k}
    _assert_small(vocab, f"tp{tp}_", LINEAR_ATOL, NUM_VOCAB_CHECKS)


def test_tp2_models_match_tp1(tp2_errors):
    _assert_small(tp2_errors, "tp2_model_", MODEL_ATOL, len(TP2_MODELS))


def test_tp4_models_with_replicated_kv_heads_match_tp1(tp4_errors):
    _assert_small(tp4_errors, "tp4_model_", MODEL_ATOL, len(TP4_MODELS))


def test_tp2_spp2_models_match_tp1(tp4_errors):
    _assert_small(tp4_errors, "tp2_spp2_model_", MODEL_ATOL, len(TP2_SPP2_MODELS))


# ---- single-process: pipeline stage slicing ----------------------------------------------


def _stage_pg(spp: int, stage: int) -> ProcessGroups:
    return ProcessGroups(
        parallel=ParallelConfig(spp=spp),
        rank=stage,
        coords=RankCoords(0, stage, 0),
        tp=GroupHandle.trivial(stage),
        kvp=GroupHandle.trivial(stage),
        world=GroupHandle.trivial(stage),
        prev_stage_rank=stage - 1 if stage > 0 else None,
        next_stage_rank=stage + 1 if stage < spp - 1 else None,
    )


@pytest.mark.parametrize("name", ["llama", "llama_linear_tied"])
def test_pipeline_stages_chain_to_full_model(name, tiny_model_dir):
    model_dir = tiny_model_dir(name)
    cfg = ModelConfig.from_pretrained(model_dir, torch.float32)
    backend = TorchReferenceBackend()
    full = load_model(model_dir, cfg, backend, "cpu")
    stages = [load_model(model_dir, cfg, backend, "cpu", _stage_pg(3, s)) for s in range(3)]
    assert [list(m.layer_range) for m in stages] == [[0], [1], [2]]
    assert [m.is_first_stage for m in stages] == [True, False, False]
    assert [m.is_last_stage for m in stages] == [False, False, True]
    assert sum(len(m.expected_weight_keys()) for m in stages) == len(full.expected_weight_keys()) + (
        1 if cfg.tie_word_embeddings else 0  # the last stage's own copy of the tied head
    )

    def caches(model: LlamaForCausalLM) -> list[tuple[torch.Tensor, torch.Tensor]]:
        shape = (8, BLOCK_SIZE, model.num_local_kv_heads, cfg.head_dim)
        return [(torch.zeros(shape), torch.zeros(shape)) for _ in range(model.num_local_layers)]

    full_caches, stage_caches = caches(full), [caches(m) for m in stages]
    with torch.inference_mode():
        for ids, pos, meta in _steps(cfg.vocab_size):
            want = full.compute_logits(full(ids, pos, full_caches, meta))
            x = ids
            for model, kv in zip(stages, stage_caches):
                x = model(x, pos, kv, meta)  # [num_tokens, hidden_size] after every stage
                assert x.shape == (len(ids), cfg.hidden_size)
            torch.testing.assert_close(stages[-1].compute_logits(x), want, rtol=0, atol=0)


def test_single_device_keys_and_heads(tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    cfg = ModelConfig.from_pretrained(model_dir, torch.float32)
    model = LlamaForCausalLM(cfg, TorchReferenceBackend())
    assert model.layer_range == range(cfg.num_layers)
    assert (model.num_local_heads, model.num_local_kv_heads) == (cfg.num_heads, cfg.num_kv_heads)
    keys = model.expected_weight_keys()
    assert "layers.2.self_attn.k_proj.weight" in keys and "lm_head.weight" in keys
    with pytest.raises(RuntimeError, match="not the last"):
        LlamaForCausalLM(cfg, TorchReferenceBackend(), _stage_pg(3, 0)).compute_logits(torch.zeros(1, 64))


# ---- layout validation -------------------------------------------------------------------


def _cfg(**overrides: int) -> ModelConfig:
    base = dict(vocab_size=320, hidden_size=64, intermediate_size=112, num_hidden_layers=3)
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        **base,
        **overrides,
    }
    return ModelConfig.from_hf_dict(hf, torch.float32)


@pytest.mark.parametrize(
    ("cfg_kw", "layout", "num_devices"),
    [
        ({}, ParallelConfig(tp=1, spp=3, kvp=2), None),
        ({}, ParallelConfig(tp=2, spp=2, kvp=2), 8),
        ({}, ParallelConfig(tp=8), 8),  # 2 KV heads replicated over 8 ranks
        ({"num_key_value_heads": 1}, ParallelConfig(tp=4), None),
    ],
)
def test_check_layout_accepts(cfg_kw, layout, num_devices):
    check_layout(_cfg(**cfg_kw), layout, num_devices)


@pytest.mark.parametrize(
    ("cfg_kw", "layout", "num_devices", "match"),
    [
        ({}, ParallelConfig(tp=0), None, "tp must be >= 1, got 0"),
        ({}, ParallelConfig(spp=-1), None, "spp must be >= 1, got -1"),
        ({}, ParallelConfig(kvp=0), None, "kvp must be >= 1, got 0"),
        ({}, ParallelConfig(tp=3), None, "num_heads 8 is not divisible by .*tp=3"),
        (
            {"num_attention_heads": 12, "num_key_value_heads": 6},
            ParallelConfig(tp=4),
            None,
            "num_kv_heads 6 .*tp=4",
        ),
        ({"intermediate_size": 100}, ParallelConfig(tp=8), None, "intermediate_size 100 .*tp=8"),
        ({}, ParallelConfig(spp=4), None, "spp=4 exceeds the model's 3 layers"),
        ({}, ParallelConfig(tp=2, spp=2, kvp=2), 4, "needs 8 devices, only 4"),
    ],
)
def test_check_layout_rejects(cfg_kw, layout, num_devices, match):
    with pytest.raises(ConfigError, match=match):
        check_layout(_cfg(**cfg_kw), layout, num_devices)
