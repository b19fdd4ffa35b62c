"""TorchReferenceBackend and LSE merging against a dense float64 reference."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from mnemosyne.layers.attention import (
    AttentionMetadata,
    TorchReferenceBackend,
    merge_attn_partials,
    merge_attn_states,
)

HEAD_DIM = 16
NUM_KV_HEADS = 2


@dataclass
class Seq:
    total: int  # number of keys of the whole sequence (global positions 0 .. total-1)
    q_pos_start: int
    query_len: int
    kv_start: int = 0
    kv_len: int | None = None  # None: all keys from kv_start to total

    @property
    def kv_count(self) -> int:
        return self.total - self.kv_start if self.kv_len is None else self.kv_len


def dense_attention(
    q: torch.Tensor,  # [nq, H, D]
    k: torch.Tensor,  # [nk, Hkv, D] at global positions kv_start ..
    v: torch.Tensor,
    q_pos_start: int,
    kv_start: int,
    scale: float,
    sliding_window: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = q.double(), k.double(), v.double()
    ratio = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(ratio, dim=1)  # [nk, H, D]
    v = v.repeat_interleave(ratio, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale  # [H, nq, nk]
    p = q_pos_start + torch.arange(q.shape[0])[:, None]  # query global positions
    t = kv_start + torch.arange(k.shape[0])[None, :]  # key global positions
    mask = t <= p
    if sliding_window is not None:
        mask &= p - t < sliding_window
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [H, nq]
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no key -> 0
    out = torch.einsum("hqk,khd->qhd", probs, v)
    return out, lse.transpose(0, 1)  # [nq, H, D], [nq, H]


def build_case(
    seqs: list[Seq],
    num_heads: int,
    block_size: int,
    gen: torch.Generator,
    poison: float = float("nan"),
    dtype: torch.dtype = torch.float32,
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    queries: torch.Tensor | None = None,
):
    """Write each sequence's held keys into a poisoned cache at a shuffled block table."""
    if kv is None:
        kv = [
            (
                torch.randn(s.total, NUM_KV_HEADS, HEAD_DIM, generator=gen, dtype=torch.float64),
                torch.randn(s.total, NUM_KV_HEADS, HEAD_DIM, generator=gen, dtype=torch.float64),
            )
            for s in seqs
        ]
    blocks_per_seq = [-(-s.kv_count // block_size) for s in seqs]
    num_blocks = sum(blocks_per_seq) + 3  # a few blocks never referenced
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    shape = (num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM)
    k_cache = torch.full(shape, poison, dtype=dtype)
    v_cache = torch.full(shape, poison, dtype=dtype)
    backend = TorchReferenceBackend()
    tables: list[list[int]] = []
    for s, n, (k, v) in zip(seqs, blocks_per_seq, kv):
        table, perm = perm[:n], perm[n:]
        tables.append(table)
        idx = list(range(s.kv_count))
        slots = [table[j // block_size] * block_size + j % block_size for j in idx]
        # Interleave rows that must not be written (-1) with the real ones.
        junk = torch.full((2, NUM_KV_HEADS, HEAD_DIM), 1e9, dtype=k.dtype)
        rows = torch.cat([k[s.kv_start : s.kv_start + s.kv_count], junk])
        vrows = torch.cat([v[s.kv_start : s.kv_start + s.kv_count], junk])
        slot_t = torch.tensor(slots + [-1, -1], dtype=torch.int64)
        order = torch.randperm(len(slot_t), generator=gen)
        backend.write_kv(rows[order], vrows[order], k_cache, v_cache, slot_t[order])
    num_tokens = sum(s.query_len for s in seqs)
    if queries is None:
        queries = torch.randn(num_tokens, num_heads, HEAD_DIM, generator=gen, dtype=torch.float64)
    meta = AttentionMetadata.build(
        query_lens=[s.query_len for s in seqs],
        q_pos_start=[s.q_pos_start for s in seqs],
        kv_start=[s.kv_start for s in seqs],
        kv_lens=[s.kv_count for s in seqs],
        block_tables=tables,
        slot_mapping=[-1] * num_tokens,
        device="cpu",
    )
    return meta, k_cache, v_cache, queries, kv


def check_against_dense(seqs, num_heads, block_size, sliding_window=None, poison=float("nan"), seed=0):
    gen = torch.Generator().manual_seed(seed)
    meta, k_cache, v_cache, q, kv = build_case(seqs, num_heads, block_size, gen, poison)
    scale = 1.0 / math.sqrt(HEAD_DIM)
    out, lse = TorchReferenceBackend().forward(q.float(), k_cache, v_cache, meta, scale, sliding_window)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert out.shape == (meta.num_tokens, num_heads, HEAD_DIM) and lse.shape == (meta.num_tokens, num_heads)
    assert not out.isnan().any() and not lse.isnan().any()
    row = 0
    for s, (k, v) in zip(seqs, kv):
        sl = slice(row, row + s.query_len)
        held = slice(s.kv_start, s.kv_start + s.kv_count)
        ref_o, ref_l = dense_attention(
            q[sl], k[held], v[held], s.q_pos_start, s.kv_start, scale, sliding_window
        )
        torch.testing.assert_close(out[sl].double(), ref_o, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse[sl].double(), ref_l, atol=1e-5, rtol=1e-5)
        row += s.query_len
    return out, lse


MIXED = [
    Seq(total=37, q_pos_start=36, query_len=1),  # decode after many keys
    Seq(total=29, q_pos_start=16, query_len=13),  # prefill chunk after a cached prefix
    Seq(total=11, q_pos_start=0, query_len=11),  # whole prompt
    Seq(total=1, q_pos_start=0, query_len=1),  # single-token prompt
]


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("ratio", [1, 4, 8])
def test_mixed_batch(block_size: int, ratio: int) -> None:
    check_against_dense(MIXED, NUM_KV_HEADS * ratio, block_size)


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_block_boundaries(block_size: int, delta: int) -> None:
    seqs = []
    for nb in (1, 2, 3):
        total = nb * block_size + delta
        seqs.append(Seq(total=total, q_pos_start=total - 1, query_len=1))  # decode
        seqs.append(Seq(total=total, q_pos_start=0, query_len=total))  # full prompt
        seqs.append(Seq(total=total, q_pos_start=block_size, query_len=total - block_size))  # chunk
    check_against_dense([s for s in seqs if s.query_len > 0], 2 * NUM_KV_HEADS, block_size)


@pytest.mark.parametrize("poison", [float("nan"), 1e30])
def test_poisoned_cache(poison: float) -> None:
    check_against_dense(MIXED, 4 * NUM_KV_HEADS, 4, poison=poison)


@pytest.mark.parametrize("window", [1, 3, 8, 100])
def test_sliding_window(window: int) -> None:
    seqs = MIXED + [Seq(total=40, q_pos_start=30, query_len=10, kv_start=21)]
    check_against_dense(seqs, 4 * NUM_KV_HEADS, 4, sliding_window=window)


def test_kv_start_mid_sequence() -> None:
    seqs = [
        Seq(total=50, q_pos_start=40, query_len=10, kv_start=13, kv_len=20),  # keys all before queries
        Seq(total=30, q_pos_start=20, query_len=10, kv_start=17),  # range overlaps the queries
        Seq(total=30, q_pos_start=5, query_len=4, kv_start=10, kv_len=7),  # queries see no key here
        Seq(total=30, q_pos_start=29, query_len=1, kv_start=6, kv_len=0),  # empty range
    ]
    out, lse = check_against_dense(seqs, 4 * NUM_KV_HEADS, 4)
    empty = slice(20, 25)
    assert torch.isneginf(lse[empty]).all() and (out[empty] == 0).all()


def test_sliding_window_rows_without_keys() -> None:
    seqs = [Seq(total=40, q_pos_start=30, query_len=6, kv_start=4, kv_len=24)]  # keys 4..27
    out, lse = check_against_dense(seqs, NUM_KV_HEADS, 4, sliding_window=4)
    # Query 30 sees 27, query 31 sees 28.. (not held): rows 1.. see nothing.
    assert torch.isfinite(lse[0]).all()
    assert torch.isneginf(lse[1:]).all() and (out[1:] == 0).all()


def test_write_kv_through_slot_mapping() -> None:
    """A prefix already cached, new K/V written at meta.slot_mapping (some -1), then attention."""
    gen = torch.Generator().manual_seed(3)
    bs, hq = 4, 8
    total, cached = 23, 14
    k = torch.randn(total, NUM_KV_HEADS, HEAD_DIM, generator=gen)
    v = torch.randn(total, NUM_KV_HEADS, HEAD_DIM, generator=gen)
    table = [5, 0, 3, 7, 2, 6]
    shape = (8, bs, NUM_KV_HEADS, HEAD_DIM)
    k_cache, v_cache = torch.full(shape, float("nan")), torch.full(shape, float("nan"))
    backend = TorchReferenceBackend()
    slots = [table[j // bs] * bs + j % bs for j in range(total)]
    backend.write_kv(k[:cached], v[:cached], k_cache, v_cache, torch.tensor(slots[:cached]))
    # Two extra rows (positions 23, 24) are "not written here": slot -1.
    new = total - cached
    q = torch.randn(new + 2, hq, HEAD_DIM, generator=gen)
    meta = AttentionMetadata.build(
        [new + 2], [cached], [0], [total], [table], slots[cached:] + [-1, -1], "cpu"
    )
    k_new = torch.cat([k[cached:], torch.full((2, NUM_KV_HEADS, HEAD_DIM), 7.0)])
    v_new = torch.cat([v[cached:], torch.full((2, NUM_KV_HEADS, HEAD_DIM), 7.0)])
    backend.write_kv(k_new, v_new, k_cache, v_cache, meta.slot_mapping)
    flat = k_cache.view(-1, NUM_KV_HEADS, HEAD_DIM)
    torch.testing.assert_close(flat[torch.tensor(slots)], k)
    assert (flat == 7.0).sum() == 0
    out, lse = backend.forward(q, k_cache, v_cache, meta, 0.3)
    ref_o, ref_l = dense_attention(q, k, v, cached, 0, 0.3, None)
    torch.testing.assert_close(out.double(), ref_o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_l, atol=1e-5, rtol=1e-5)


def test_bf16_forward() -> None:
    gen = torch.Generator().manual_seed(1)
    meta, k_cache, v_cache, q, kv = build_case(MIXED, 4 * NUM_KV_HEADS, 4, gen, dtype=torch.bfloat16)
    out, lse = TorchReferenceBackend().forward(q.bfloat16(), k_cache, v_cache, meta, 0.25)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    ref, _ = check_against_dense(MIXED, 4 * NUM_KV_HEADS, 4, seed=1)
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


# ---------------------------------------------------------------- merging


def split_partials(seqs: list[Seq], cuts: list[int], num_heads: int, block_size: int, window=None):
    """Attention of `seqs` over key ranges [cuts[j], cuts[j+1]) (clamped per sequence), each
    range in its own cache/block table as a KV-parallel group would hold it."""
    gen = torch.Generator().manual_seed(7)
    full_meta, kc, vc, q, kv = build_case(seqs, num_heads, block_size, gen)
    backend = TorchReferenceBackend()
    scale = 1.0 / math.sqrt(HEAD_DIM)
    full = backend.forward(q.float(), kc, vc, full_meta, scale, window)
    partials = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        part = [
            Seq(s.total, s.q_pos_start, s.query_len, min(a, s.total), max(0, min(b, s.total) - a))
            for s in seqs
        ]
        meta, kc, vc, _, _ = build_case(part, num_heads, block_size, gen, kv=kv, queries=q)
        partials.append(backend.forward(q.float(), kc, vc, meta, scale, window))
    return full, partials


SPLIT_SEQS = [
    Seq(total=37, q_pos_start=36, query_len=1),
    Seq(total=29, q_pos_start=16, query_len=13),
    Seq(total=11, q_pos_start=0, query_len=11),
]


@pytest.mark.parametrize("window", [None, 6])
def test_merge_two_ranges(window: int | None) -> None:
    (fo, fl), [(ao, al), (bo, bl)] = split_partials(SPLIT_SEQS, [0, 9, 40], 8, 4, window)
    assert torch.isneginf(bl).any()  # some rows see nothing in the second range
    mo, ml = merge_attn_states(ao, al, bo, bl)
    torch.testing.assert_close(mo, fo, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ml, fl, atol=1e-5, rtol=1e-5)
    mo2, ml2 = merge_attn_states(bo, bl, ao, al)  # order does not matter
    torch.testing.assert_close(mo2, fo, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ml2, fl, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 6])
def test_merge_three_ranges(window: int | None) -> None:
    (fo, fl), parts = split_partials(SPLIT_SEQS, [0, 5, 22, 40], 8, 4, window)
    mo, ml = merge_attn_partials([p[0] for p in parts], [p[1] for p in parts])
    torch.testing.assert_close(mo, fo, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ml, fl, atol=1e-5, rtol=1e-5)
    # Pairwise merging gives the same result.
    o01, l01 = merge_attn_states(parts[0][0], parts[0][1], parts[1][0], parts[1][1])
    po, pl = merge_attn_states(o01, l01, parts[2][0], parts[2][1])
    torch.testing.assert_close(po, fo, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pl, fl, atol=1e-5, rtol=1e-5)


def test_merge_neg_inf() -> None:
    o_a = torch.randn(3, 2, 4)
    o_b = torch.randn(3, 2, 4)
    l_a = torch.tensor([[0.5, float("-inf")], [float("-inf"), float("-inf")], [1.0, 2.0]])
    l_b = torch.tensor([[float("-inf"), 0.3], [float("-inf"), float("-inf")], [float("-inf"), 2.0]])
    o_b[0, 0] = float("nan")  # a partial with lse -inf must not leak into the result
    o_a[1] = float("nan")
    o, lse = merge_attn_states(o_a, l_a, o_b, l_b)
    assert not o.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(o[0, 0], o_a[0, 0])
    torch.testing.assert_close(o[0, 1], o_b[0, 1])
    assert lse[0, 0] == 0.5 and lse[0, 1] == pytest.approx(0.3)
    assert torch.isneginf(lse[1]).all() and (o[1] == 0).all()
    torch.testing.assert_close(o[2, 1], (o_a[2, 1] + o_b[2, 1]) / 2)
    assert lse[2, 1] == pytest.approx(2.0 + math.log(2.0))
    o3, l3 = merge_attn_partials([o_a, o_b, o_b], [l_a, l_b, torch.full_like(l_b, float("-inf"))])
    torch.testing.assert_close(o3, o)
    torch.testing.assert_close(l3, lse)


def test_merge_bf16() -> None:
    (fo, fl), [(ao, al), (bo, bl)] = split_partials(SPLIT_SEQS, [0, 9, 40], 8, 4)
    mo, ml = merge_attn_states(ao.bfloat16(), al, bo.bfloat16(), bl)
    assert mo.dtype == torch.bfloat16 and ml.dtype == torch.float32
    torch.testing.assert_close(mo.float(), fo, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(ml, fl, atol=1e-5, rtol=1e-5)
    mo3, ml3 = merge_attn_partials([ao.bfloat16(), bo.bfloat16()], [al, bl])
    assert mo3.dtype == torch.bfloat16
    torch.testing.assert_close(mo3, mo)
    torch.testing.assert_close(ml3, ml)
