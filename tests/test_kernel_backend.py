"""KernelBackend (decode kernel + Triton prefill tiles + cuDNN chunks) against the reference.

One batch mixes every path: decodes, short chunks (Triton tiles), long chunks (cuDNN on
CUDA in bf16/fp16; Triton elsewhere), a KVP group's older piece (keys all before the
queries), contiguous and shuffled blocks. On CPU the Triton kernels run in the interpreter.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from mnemosyne.kernels.cudnn_prefill import DenseChunk, dense_chunk_attention  # noqa: E402
from mnemosyne.kernels.merge_attn import merge_attn_states_into, merge_splits  # noqa: E402
from mnemosyne.latency.kernel_cost import H200_COST, ChunkCostModel, ChunkPath, PathCost  # noqa: E402
from mnemosyne.layers.attention.kernel_backend import KernelBackend  # noqa: E402
from mnemosyne.layers.attention.kernel_plan import ChunkKernelConfig  # noqa: E402
from mnemosyne.layers.attention.merge import merge_attn_states  # noqa: E402
from mnemosyne.layers.attention.metadata import AttentionMetadata  # noqa: E402
from mnemosyne.layers.attention.reference import TorchReferenceBackend  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _batch(
    seqs: list[tuple[int, int, int, int]],  # (query_len, q_pos_start, kv_start, kv_len)
    h: int,
    hkv: int,
    d: int,
    block: int,
    dtype: torch.dtype,
    shuffled: bool,
    seed: int = 0,
):
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-kv_len // block) for *_, kv_len in seqs]
    num_blocks = sum(blocks_per_seq) + 3
    ids = torch.randperm(num_blocks, generator=g) if shuffled else torch.arange(num_blocks)
    tables, at = [], 0
    for n in blocks_per_seq:
        tables.append(ids[at : at + n].tolist())
        at += n
    k_cache = torch.randn(num_blocks, block, hkv, d, generator=g).to(dtype).to(DEVICE)
    v_cache = torch.randn(num_blocks, block, hkv, d, generator=g).to(dtype).to(DEVICE)
    num_tokens = sum(s[0] for s in seqs)
    query = torch.randn(num_tokens, h, d, generator=g).to(dtype).to(DEVICE)
    meta = AttentionMetadata.build(
        query_lens=[s[0] for s in seqs],
        q_pos_start=[s[1] for s in seqs],
        kv_start=[s[2] for s in seqs],
        kv_lens=[s[3] for s in seqs],
        block_tables=tables,
        slot_mapping=[-1] * num_tokens,
        device=DEVICE,
    )
    return query, k_cache, v_cache, meta


def _reference(query, k_cache, v_cache, meta, scale, window):
    ref_meta = AttentionMetadata(**{**meta.__dict__, "backend_plan": None})
    return TorchReferenceBackend().forward(
        query.float(), k_cache.float(), v_cache.float(), ref_meta, scale, window
    )


# cuDNN costs 1 s per call below 256 queries and nothing from 256 on.
_LONG_TO_CUDNN = dataclasses.replace(
    H200_COST, cudnn=PathCost(chunks=(255, 256), fixed_s=(1.0, 0.0), per_key_s=(0.0, 0.0))
)

MIXED = [
    (1, 40, 0, 41),  # decode
    (7, 13, 0, 20),  # short chunk: Triton tiles
    (300, 100, 0, 400),  # long chunk after a prefix (cuDNN on CUDA half precision)
    (1, 63, 0, 64),  # decode at a block boundary
    (260, 500, 0, 240),  # an older KVP piece: keys [0, 240) all before the queries
    (17, 0, 0, 17),  # a first chunk
    (1, 90, 32, 59),  # decode on a newer KVP piece (kv_start > 0)
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shuffled", [False, True])
@pytest.mark.parametrize("window", [None, 37])
def test_mixed_batch_matches_reference(dtype, shuffled, window):
    h, hkv, d, block = 8, 2, 64, 16
    query, k_cache, v_cache, meta = _batch(MIXED, h, hkv, d, block, dtype, shuffled)
    # Long chunks to cuDNN (where it can take them), short ones to the Triton chunk kernel.
    backend = KernelBackend(
        h // hkv, d, dtype, DEVICE, dense_segment_tokens=128, cost_model=_LONG_TO_CUDNN,
        chunk_config=ChunkKernelConfig(max_splits=1),
    )  # fmt: skip
    scale = d**-0.5
    out, lse = backend.forward(query, k_cache, v_cache, meta, scale, window)
    plan = meta.backend_plan
    assert plan.decode_seq_ids is not None and plan.tile_seq is not None
    if DEVICE.type == "cuda" and dtype != torch.float32 and window is None:
        assert [c.seq for c in plan.dense] == [2, 4]  # both long chunks take cuDNN
    else:
        assert not plan.dense
    ref_out, ref_lse = _reference(query, k_cache, v_cache, meta, scale, window)
    atol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref_out, atol=atol, rtol=0)
    seen = torch.isfinite(ref_lse)
    assert torch.equal(seen, torch.isfinite(lse))
    torch.testing.assert_close(lse[seen], ref_lse[seen], atol=atol * 10, rtol=0)


@pytest.mark.parametrize("dtype,window", [(torch.float32, None), (torch.bfloat16, 29)])
def test_split_chunks_in_a_mixed_batch(dtype, window):
    """Short chunks after prefixes of a few hundred keys, a decode and a KVP piece, with the
    chunk kernel split along the keys (>= 64 keys per split here) and merged."""
    h, hkv, d, block = 8, 2, 64, 16
    seqs = [(1, 40, 0, 41), (7, 13, 0, 20), (5, 300, 0, 305), (4, 500, 0, 240), (16, 222, 32, 206)]
    query, k_cache, v_cache, meta = _batch(seqs, h, hkv, d, block, dtype, True, seed=5)
    backend = _split_kv_backend(dtype)
    out, lse = backend.forward(query, k_cache, v_cache, meta, d**-0.5, window)
    assert meta.backend_plan.chunk_splits > 1
    _assert_matches_reference(out, lse, query, k_cache, v_cache, meta, window)


def _split_kv_backend(dtype: torch.dtype, h: int = 8, hkv: int = 2, d: int = 64) -> KernelBackend:
    """The Triton chunk kernel for every chunk, split along the keys from 64 keys on."""
    return KernelBackend(
        h // hkv, d, dtype, DEVICE, chunk_config=ChunkKernelConfig(min_split_keys=64),
        force_path=ChunkPath.TRITON_SPLITKV,
    )  # fmt: skip


def _assert_matches_reference(out, lse, query, k_cache, v_cache, meta, window) -> None:
    scale = query.shape[-1] ** -0.5
    ref_out, ref_lse = _reference(query, k_cache, v_cache, meta, scale, window)
    atol = 1e-5 if query.dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref_out, atol=atol, rtol=0)
    seen = torch.isfinite(ref_lse)
    assert torch.equal(seen, torch.isfinite(lse))
    torch.testing.assert_close(lse[seen], ref_lse[seen], atol=atol * 10, rtol=0)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("shuffled", [False, True])
def test_cudnn_chunk_segments_and_runs(shuffled):
    """A 2000-token chunk after 5000 keys, read in segments of 1024 keys, some in the
    leading run of blocks (views), the rest gathered."""
    h, hkv, d, block = 32, 8, 128, 16
    seqs = [(2000, 5000, 0, 7000)]
    query, k_cache, v_cache, meta = _batch(seqs, h, hkv, d, block, torch.bfloat16, shuffled)
    table = meta.block_tables[0]
    run = (int(table[0]), 200) if not shuffled else (int(table[0]), 1)
    chunk = DenseChunk(0, 0, 2000, 5000, True, run)
    out, lse = torch.full_like(query, float("nan")), torch.full((2000, h), float("nan"), device=DEVICE)
    dense_chunk_attention(query, k_cache, v_cache, table, chunk, d**-0.5, 1024, out, lse)
    ref_out, ref_lse = _reference(query, k_cache, v_cache, meta, d**-0.5, None)
    torch.testing.assert_close(out.float(), ref_out, atol=2e-2, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=2e-2, rtol=0)


def _h200_backend() -> KernelBackend:
    backend = KernelBackend(4, 64, torch.bfloat16, torch.device("cpu"), use_cudnn=False,
                            chunk_config=ChunkKernelConfig(min_split_keys=1024))  # fmt: skip
    backend.num_sms = 132
    return backend


def _host_plan(chunks: list[tuple[int, int]], num_sms: int | None = None):
    """The host plan of chunks (c, prefix) on an H200-sized backend (host lists only), for
    num_sms of its SMs (None: all)."""
    meta = AttentionMetadata.build(
        [c for c, _ in chunks], [p for _, p in chunks], [0] * len(chunks), [c + p for c, p in chunks],
        [[0] * -(-(c + p) // 64) for c, p in chunks], [-1] * sum(c for c, _ in chunks), torch.device("cpu"),
    )  # fmt: skip
    return _h200_backend().host_plan(meta, 8, None, 64, num_sms)


def test_splits_are_planned_for_the_sms_the_step_runs_on():
    """A 512-token chunk after 1568 keys: 2 splits to fill an H200's 132 SMs, 1 on the 16 a
    prefill lane split leaves the steps (its tiles fill them already); the graphs of such a
    split hold fewer splits at most."""
    from mnemosyne.layers.attention.static_plan import StaticPlans

    assert _host_plan([(512, 1568)]).chunk_splits == 2
    assert _host_plan([(512, 1568)], num_sms=16).chunk_splits == 1
    backend, cpu = _h200_backend(), torch.device("cpu")
    assert StaticPlans(backend, 1024, 8, 64, cpu, 16).num_splits < StaticPlans(backend, 1024, 8, 64, cpu).num_splits


def test_a_long_prefix_beside_many_short_tiles_runs_in_its_own_launch():
    """tile_groups.py: the measured case (a 2340-token prompt beside 64 tokens after 408K keys)
    takes two launches at their own split counts; every tile in exactly one."""
    host = _host_plan([(2340, 1024), (64, 408064)])
    others, solo = host.groups
    assert solo.splits == host.chunk_splits >= 4 * others.splits
    assert set(others.tile_seq) == {0} and set(solo.tile_seq) == {1}
    assert sorted(zip(others.tile_seq + solo.tile_seq, others.tile_q_offset + solo.tile_q_offset)) == sorted(
        zip(host.tile_seq, host.tile_q_offset)
    )
    assert others.rows == list(range(2340)) and solo.rows == list(range(2340, 2404))
    for chunks in ([(2623, 320), (64, 350176)], [(128, 397664), (1408, 0)], [(1024, 320), (32, 350176)]):
        assert len(_host_plan(chunks).groups) == 2, chunks  # the session-10 probe's other cases
    assert not _host_plan([(64, 1024), (64, 408064)]).groups  # the others' few tiles: one launch
    assert not _host_plan([(2340, 300000), (64, 408064)]).groups  # alike lengths: one launch
    assert not _host_plan([(64, 408064)]).groups


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_tile_launches_match_reference(dtype):
    """A long prefix's chunk in its own launch beside short chunks (CPU: 8 SMs, 64-key splits)."""
    h, hkv, d, block = 8, 2, 64, 16
    seqs = [(1, 40, 0, 41), (40, 0, 0, 40), (33, 7, 0, 40), (16, 2000, 0, 2016), (1, 63, 0, 64)]
    query, k_cache, v_cache, meta = _batch(seqs, h, hkv, d, block, dtype, True, seed=7)
    backend = _split_kv_backend(dtype)
    backend.num_sms = 8
    out, lse = backend.forward(query, k_cache, v_cache, meta, d**-0.5, None)
    launches = meta.backend_plan.tile_launches
    assert len(launches) == 2 and launches[1].splits > 1
    _assert_matches_reference(out, lse, query, k_cache, v_cache, meta, None)


@pytest.mark.parametrize("dtypes", [(torch.float32,) * 3, (torch.float32, torch.bfloat16, torch.float32),
                                    (torch.bfloat16,) * 3])  # fmt: skip
def test_fused_merge_matches_torch_merge(dtypes):
    """merge_attn_states_into vs merge_attn_states: -inf rows on one side and both sides,
    strided (permuted) inputs, in place into the first operand."""
    dt_a, dt_b, dt_out = dtypes
    g = torch.Generator().manual_seed(3)
    n, h, d = 9, 6, 48
    a = torch.randn(n, h, d, generator=g).to(dt_a).to(DEVICE)
    b = torch.randn(h, n, d, generator=g).to(dt_b).to(DEVICE).permute(1, 0, 2)  # strided
    la, lb = torch.randn(n, h, generator=g).to(DEVICE), torch.randn(n, h, generator=g).to(DEVICE)
    la[0], lb[1] = float("-inf"), float("-inf")
    la[2, :3], lb[2, :3] = float("-inf"), float("-inf")
    b[1] = float("nan")  # zero weight must zero a non-finite partial
    ref_out, ref_lse = merge_attn_states(a.float(), la, b.float(), lb)
    if dt_out == dt_a:
        out, lse = a, la.clone()
        merge_attn_states_into(out, lse, a, la, b, lb)  # in place
    else:
        out, lse = torch.empty(n, h, d, dtype=dt_out, device=DEVICE), torch.empty(n, h, device=DEVICE)
        merge_attn_states_into(out, lse, a, la, b, lb)
    atol = 1e-6 if dtypes == (torch.float32,) * 3 else 2e-2
    torch.testing.assert_close(out.float(), ref_out, atol=atol, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=0)


@pytest.mark.parametrize("num_splits,num_heads,head_dim", [(1, 4, 64), (3, 5, 48), (17, 8, 128), (40, 2, 64)])
def test_split_merge_matches_a_torch_merge(num_splits, num_heads, head_dim):
    """merge_splits (the chunk kernels' phase 2) against folding merge_attn_states over the
    splits: empty splits (-inf, their output garbage: never read), rows with no key at all,
    padding (-1) rows and uncovered rows left untouched, split counts across the 8-split steps."""
    g = torch.Generator().manual_seed(num_splits)
    n = 11
    o_ws = torch.randn(n, num_heads, num_splits, head_dim, generator=g)
    l_ws = torch.randn(n, num_heads, num_splits, generator=g) * 4
    empty = torch.rand(n, num_heads, num_splits, generator=g) < 0.4
    l_ws[empty] = float("-inf")
    o_ws[empty] = float("nan")  # an empty split's output is never written
    l_ws[3] = float("-inf")  # a row that sees no key
    o_ws, l_ws = o_ws.to(DEVICE), l_ws.to(DEVICE)
    rows = torch.tensor([0, 1, 2, 3, -1, 5, 6, 7, 8, 9], dtype=torch.int32, device=DEVICE)  # row 4: -1, row 10: not covered
    out = torch.full((n, num_heads, head_dim), 7.0, dtype=torch.bfloat16, device=DEVICE)
    lse = torch.full((n, num_heads), 7.0, device=DEVICE)
    merge_splits(o_ws, l_ws, out, lse, rows, num_splits)
    ref_out, ref_lse = o_ws[:, :, 0], l_ws[:, :, 0]
    for s in range(1, num_splits):
        ref_out, ref_lse = merge_attn_states(ref_out, ref_lse, o_ws[:, :, s], l_ws[:, :, s])
    ref_out = torch.where(torch.isinf(ref_lse)[..., None], 0.0, ref_out)  # no key: out 0
    covered = [r for r in range(n) if r not in (4, 10)]
    torch.testing.assert_close(out[covered].float(), ref_out[covered], atol=2e-2, rtol=0)
    torch.testing.assert_close(lse[covered], ref_lse[covered], atol=1e-5, rtol=0)
    assert (out[[4, 10]] == 7).all() and (lse[[4, 10]] == 7).all()


def test_cost_model_picks_the_cheaper_path():
    model = H200_COST
    model.check_integrity()
    assert _LONG_TO_CUDNN.cheaper(300, 400, 8, 64) is ChunkPath.CUDNN
    assert _LONG_TO_CUDNN.cheaper(7, 400, 8, 64) is ChunkPath.TRITON_SPLITKV
    # cuDNN's host floor inside a step: at head dim 64 (1B heads) a 256-token chunk after
    # 216K keys costs both paths about 1 ms a layer; the floor timed alone picked cuDNN,
    # which then ran its steps host-bound (26 against 22 ms on an H200).
    assert H200_COST.cheaper(256, 216704, 32, 64, True) is ChunkPath.TRITON_SPLITKV
    alone = dataclasses.replace(H200_COST, cudnn_host_in_step=1.0, cudnn_small_head_max_chunk=0)
    assert alone.cheaper(256, 216704, 32, 64, True) is ChunkPath.CUDNN
    assert H200_COST.cheaper(512, 200000, 32, 128, True) is ChunkPath.CUDNN  # 8B heads: device-bound
    # At head dim 64 a cuDNN chunk of up to 1024 tokens costs per key what it costs at 128:
    # the 1B mixed scenario's 384 / 352 tokens after 191K / 209K keys ran 38-41 ms a step on
    # cuDNN against 29 ms on Triton. The 8B heads' choices there stay cuDNN; long chunks at 64 too.
    scaled = dataclasses.replace(H200_COST, cudnn_small_head_max_chunk=0)
    for chunk, keys in ((384, 191072 + 384), (352, 209472 + 352), (1024, 200000)):  # keys: prefix + own
        assert scaled.cheaper(chunk, keys, 32, 64, True) is ChunkPath.CUDNN
        assert H200_COST.cheaper(chunk, keys, 32, 64, True) is ChunkPath.TRITON_SPLITKV
        assert H200_COST.cheaper(chunk, keys, 32, 128, True) is ChunkPath.CUDNN
    assert H200_COST.cheaper(2048, 100000, 32, 64, True) is ChunkPath.CUDNN
    assert H200_COST.path_shape_factor(ChunkPath.CUDNN, 384, 32, 64) == 1.0
    assert H200_COST.path_shape_factor(ChunkPath.TRITON_SPLITKV, 384, 32, 64) == 0.5
    assert ChunkCostModel.from_dict(H200_COST.to_dict()) == H200_COST
    older = {k: v for k, v in H200_COST.to_dict().items() if k != "cudnn_host_in_step"}
    assert ChunkCostModel.from_dict(older).cudnn_host_in_step == 1.0
    older = {k: v for k, v in H200_COST.to_dict().items() if k != "cudnn_small_head_max_chunk"}
    assert ChunkCostModel.from_dict(older).cudnn_small_head_max_chunk == 0
    with pytest.raises(ValueError, match="cudnn_host_in_step"):
        dataclasses.replace(H200_COST, cudnn_host_in_step=0.5).check_integrity()
    # Interpolation between measured lengths and extrapolation beyond them.
    # t = max(fixed, keys * per_key * shape factor)
    cost = PathCost(chunks=(16, 64), fixed_s=(1.0, 3.0), per_key_s=(1.0, 5.0))
    assert cost.seconds(8, 2, 1.0) == 2.0
    assert cost.seconds(8, 0, 1.0) == 1.0
    assert cost.seconds(32, 2, 1.0) == pytest.approx(2 * (1 + 4 / 3))
    assert cost.seconds(128, 2, 0.5) == 10.0
    assert cost.seconds(128, 0, 0.5) == 3.0
    with pytest.raises(ValueError):
        PathCost(chunks=(64, 16), fixed_s=(1.0, 1.0), per_key_s=(1.0, 1.0)).check_integrity()
    # Forced paths ignore the model.
    meta = _batch([(300, 100, 0, 400)], 8, 2, 64, 16, torch.bfloat16, False)[3]
    forced = KernelBackend(4, 64, torch.bfloat16, DEVICE, use_cudnn=True, force_path=ChunkPath.TRITON_SPLITKV)
    assert not forced.plan(meta, 2, None).dense
    forced = KernelBackend(4, 64, torch.bfloat16, DEVICE, use_cudnn=True, force_path=ChunkPath.CUDNN)
    assert [c.seq for c in forced.plan(meta, 2, None).dense] == [0]


def test_fragmented_prefix_goes_to_the_triton_kernel():
    """The cost model's cuDNN figures are for the batched prefix split, which needs the split
    keys in the leading run of consecutive blocks; a chunk whose prefix is fragmented (as a
    long prompt's blocks can be in serving) takes the Triton kernel, which walks any table.
    A chunk that wants no split stays on cuDNN either way."""
    block, c, prefix = 64, 300, 20000
    n_blocks = -(-(prefix + c) // block)
    contiguous = list(range(n_blocks))
    fragmented = list(range(0, 2 * n_blocks, 2))  # every other block: runs of one
    backend = KernelBackend(4, 64, torch.bfloat16, DEVICE, use_cudnn=True, cost_model=_LONG_TO_CUDNN)
    backend.num_sms = 132  # an H200: 2 * 132 programs wanted, 2 * ceil(4 * 300 / 128) = 20 per split
    for table, on_cudnn in ((contiguous, True), (fragmented, False)):
        meta = AttentionMetadata.build(
            query_lens=[c], q_pos_start=[prefix], kv_start=[0], kv_lens=[prefix + c],
            block_tables=[table], slot_mapping=[-1] * c, device="cpu",
        )  # fmt: skip
        plan = backend.host_plan(meta, 2, None, block)
        assert [d.seq for d in plan.dense] == ([0] if on_cudnn else [])
        assert (plan.dense[0].prefix_splits > 1) if on_cudnn else plan.tile_seq
    many_queries = 8192  # enough programs: no split, so the run does not matter
    meta = AttentionMetadata.build(
        query_lens=[many_queries], q_pos_start=[prefix], kv_start=[0], kv_lens=[prefix + many_queries],
        block_tables=[list(range(0, 2 * (n_blocks + 128), 2))], slot_mapping=[-1] * many_queries, device="cpu",
    )  # fmt: skip
    plan = backend.host_plan(meta, 2, None, block)
    assert [(d.seq, d.prefix_splits) for d in plan.dense] == [(0, 1)]


def _math_cudnn(q, k, v, causal, scale):
    """The cuDNN call's contract in plain torch (CPU tests of the code around it)."""
    s = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * scale
    if causal:
        nq, nk = s.shape[-2:]
        s = s.masked_fill(
            torch.ones(nq, nk, dtype=torch.bool, device=s.device).triu(nk - nq + 1), float("-inf")
        )
    lse = torch.logsumexp(s, -1)
    return torch.einsum("bhqk,bhkd->bhqd", torch.softmax(s, -1), v.float()).to(q.dtype), lse


@pytest.mark.parametrize("splits,prefix", [(3, 301), (4, 64), (2, 1000)])
def test_cudnn_prefix_splits_batched(monkeypatch, splits, prefix):
    """The prefix split into `splits` pieces of one batched call (a strided view of the leading
    run), the remainder and the own keys merged after; here with the cuDNN call replaced by
    its contract in torch (on CUDA: the real call)."""
    from mnemosyne.kernels import cudnn_prefill

    if DEVICE.type != "cuda":
        monkeypatch.setattr(cudnn_prefill, "_cudnn", _math_cudnn)
    h, hkv, d, block, c = 8, 2, 64, 16, 9
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    query, k_cache, v_cache, meta = _batch([(c, prefix, 0, prefix + c)], h, hkv, d, block, dtype, False)
    table = meta.block_tables[0]
    n_blocks = -(-(prefix + c) // block)
    run = (int(table[0]), n_blocks if prefix != 1000 else 40)  # 1000: the run ends early -> unbatched
    chunk = DenseChunk(0, 0, c, prefix, True, run, prefix_splits=splits)
    out, lse = torch.full_like(query, float("nan")), torch.full((c, h), float("nan"), device=DEVICE)
    dense_chunk_attention(query, k_cache, v_cache, table, chunk, d**-0.5, 128, out, lse)
    ref_out, ref_lse = _reference(query, k_cache, v_cache, meta, d**-0.5, None)
    atol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.float(), ref_out, atol=atol, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=atol, rtol=0)


def test_warm_up_compiles_the_chunk_variants_read_only():
    """warm_up launches both tile heights, direct and split (with the merge), and leaves the
    cache as it was."""
    h, hkv, d = 8, 2, 32
    backend = KernelBackend(h // hkv, d, torch.float32, DEVICE)
    k_cache = torch.randn(4, 16, hkv, d, device=DEVICE)
    v_cache = torch.randn_like(k_cache)
    before = (k_cache.clone(), v_cache.clone())
    backend.warm_up(k_cache, v_cache, None)
    backend.warm_up(k_cache, v_cache, 5)
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])
