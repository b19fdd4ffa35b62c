"""Triton split-KV decode attention and fused KV write against TorchReferenceBackend.

Without CUDA the kernels run in the Triton interpreter on CPU tensors (TRITON_INTERPRET
must be set before the kernel modules are imported); with CUDA the same tests run on GPU.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from mnemosyne.kernels.decode_attention import paged_decode_attention  # noqa: E402
from mnemosyne.kernels.decode_items import choose_split_budget, decode_workspace_items  # noqa: E402
from mnemosyne.kernels.decode_launch import (  # noqa: E402
    LAUNCH_16BIT,
    LAUNCH_16BIT_CONFINED,
    LAUNCH_16BIT_CONFINED_POINTERS,
    launch_options,
)
from mnemosyne.kernels.host_math import confined_decode_boxes  # noqa: E402
from mnemosyne.kernels.kv_write import write_kv_cache  # noqa: E402
from mnemosyne.layers.attention import AttentionMetadata, TorchReferenceBackend  # noqa: E402

device = "cuda" if torch.cuda.is_available() else "cpu"
POISON_OUT = float("nan")
POISON_LSE = 1e4


def make_batch(
    specs: list[tuple[int, int, int, int]],  # per seq (query_len, q_pos_start, kv_start, kv_len)
    block_size: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Random query [T, H, D] and caches with shuffled block tables; unused slots hold NaN."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-kv_len // block_size) for _, _, _, kv_len in specs]
    num_blocks = sum(blocks_per_seq) + 3
    pool = torch.randperm(num_blocks, generator=gen).tolist()
    tables, used = [], torch.zeros(num_blocks, block_size, dtype=torch.bool)
    for (_, _, _, kv_len), n in zip(specs, blocks_per_seq):
        table, pool = pool[:n], pool[n:]
        tables.append(table)
        slots = torch.tensor(table, dtype=torch.long)[:, None] * block_size + torch.arange(block_size)
        used.view(-1)[slots.view(-1)[:kv_len]] = True
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).masked_fill(~used[:, :, None, None], float("nan"))
    v_cache = torch.randn(shape, generator=gen).masked_fill(~used[:, :, None, None], float("nan"))
    num_tokens = sum(s[0] for s in specs)
    query = torch.randn(num_tokens, num_heads, head_dim, generator=gen)
    meta = AttentionMetadata.build(
        query_lens=[s[0] for s in specs],
        q_pos_start=[s[1] for s in specs],
        kv_start=[s[2] for s in specs],
        kv_lens=[s[3] for s in specs],
        block_tables=tables,
        slot_mapping=[-1] * num_tokens,
        device=device,
    )
    to = {"device": device, "dtype": dtype}
    return query.to(**to), k_cache.to(**to), v_cache.to(**to), meta


def decode_specs(block_size: int, window: int | None) -> list[tuple[int, int, int, int]]:
    """Decode sequences (query_len 1) of mixed lengths, KVP pieces and empty ranges."""
    B = block_size
    specs = [(1, n - 1, 0, n) for n in (1, B - 1, B, B + 1, 2 * B + 3, 37, 300) if n > 0]
    specs += [
        (1, 0, 0, 0),  # no key at all
        (1, 250, 100, 50),  # KVP group with an older piece: all keys before the query
        (1, 140, 100, 41),  # piece ending right at the query
        (1, 90, 100, 20),  # query before the piece: sees nothing
    ]
    if window is not None:
        specs.append((1, 100 + 41 + window - 5, 100, 41))  # window cuts the piece
    return specs


def run_decode(
    query, k_cache, v_cache, meta, seq_ids, scale, window, split_budget, **kw
) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.full_like(query, POISON_OUT)
    lse = torch.full(query.shape[:2], POISON_LSE, dtype=torch.float32, device=device)
    ids = torch.tensor(seq_ids, dtype=torch.int32, device=device)
    paged_decode_attention(
        query, k_cache, v_cache, meta.query_start_loc, meta.q_pos_start, meta.kv_start,
        meta.kv_lens, meta.block_tables, ids, out, lse, scale, window, split_budget, **kw,
    )  # fmt: skip
    return out, lse


def check(out, lse, query, k_cache, v_cache, meta, seq_ids, scale, window, atol) -> None:
    """Rows of seq_ids match the fp32 reference; every other row is untouched."""
    ref_out, ref_lse = TorchReferenceBackend().forward(
        query.float(), k_cache.float(), v_cache.float(), meta, scale, window
    )
    qsl = meta.query_start_loc.tolist()
    rows = torch.zeros(query.shape[0], dtype=torch.bool, device=device)
    rows[[qsl[i] for i in seq_ids]] = True
    torch.testing.assert_close(out[rows].float(), ref_out[rows], atol=atol, rtol=atol)
    assert torch.equal(torch.isneginf(lse[rows]), torch.isneginf(ref_lse[rows]))
    torch.testing.assert_close(lse[rows], ref_lse[rows], atol=max(atol, 1e-5), rtol=1e-5)
    assert torch.isnan(out[~rows]).all() and (lse[~rows] == POISON_LSE).all()


# (dtype, group, head_dim, block_size, split_budget, window, block_n; None: `launch_options`)
CASES = [
    (torch.float32, 1, 16, 1, 1, None, 16),
    (torch.float32, 4, 64, 5, 3, 7, 16),
    (torch.float32, 8, 128, 16, 40, None, 64),  # more items wanted than tiles
    (torch.float32, 2, 48, 5, 2, 64, 32),  # head_dim not a power of two
    (torch.bfloat16, 4, 128, 16, 3, None, 32),
    (torch.bfloat16, 8, 64, 5, 1, 50, 16),
    (torch.float16, 1, 32, 16, 4, None, 64),
    (torch.bfloat16, 4, 64, 64, 5, None, None),  # the engine's launch at head dim 64: 128-key tiles over pages
    (torch.bfloat16, 4, 64, 5, 2, 50, 128),
]


@pytest.mark.parametrize("dtype,group,head_dim,block_size,split_budget,window,block_n", CASES)
def test_decode_matches_reference(dtype, group, head_dim, block_size, split_budget, window, block_n):
    num_kv_heads = 2
    specs = decode_specs(block_size, window)
    query, k_cache, v_cache, meta = make_batch(
        specs, block_size, group * num_kv_heads, num_kv_heads, head_dim, dtype, seed=group * head_dim
    )
    seq_ids = list(range(len(specs)))
    scale = head_dim**-0.5
    out, lse = run_decode(
        query, k_cache, v_cache, meta, seq_ids, scale, window, split_budget, block_n=block_n
    )
    check(
        out,
        lse,
        query,
        k_cache,
        v_cache,
        meta,
        seq_ids,
        scale,
        window,
        1e-5 if dtype == torch.float32 else 2e-2,
    )


def test_decode_confined_launch_options():
    """A lane split's few SMs: TMA boxes of one warp where the pages take 64-key boxes, else
    pointer gathers of 4 warps; fp32, head dim 64 and every SM keep their options."""
    dev = torch.device(device)
    assert launch_options(128, torch.bfloat16, True, 64, dev) == LAUNCH_16BIT_CONFINED
    assert LAUNCH_16BIT_CONFINED.use_tma and not LAUNCH_16BIT.use_tma
    assert launch_options(128, torch.bfloat16, True, 128, dev) == LAUNCH_16BIT_CONFINED
    assert launch_options(128, torch.bfloat16, True, 16, dev) == LAUNCH_16BIT_CONFINED_POINTERS
    assert launch_options(128, torch.bfloat16, True) == LAUNCH_16BIT_CONFINED_POINTERS
    assert launch_options(96, torch.bfloat16, True, 64, dev) == LAUNCH_16BIT_CONFINED_POINTERS  # no box of 96
    assert launch_options(128, torch.bfloat16, False, 64, dev) == LAUNCH_16BIT
    assert launch_options(64, torch.bfloat16, True, 64, dev) == launch_options(64, torch.bfloat16)
    assert launch_options(128, torch.float32, True, 64, dev) == launch_options(128, torch.float32)
    for head_dim, dtype, block_size in itertools.product((64, 96, 128, 256), (torch.bfloat16, torch.float32), (16, 64)):
        boxes = confined_decode_boxes(head_dim, dtype.itemsize, block_size)  # what the steps' model assumes
        assert launch_options(head_dim, dtype, True, block_size, dev).use_tma == boxes


@pytest.mark.parametrize("launch", [LAUNCH_16BIT_CONFINED, LAUNCH_16BIT_CONFINED_POINTERS])
@pytest.mark.parametrize("block_size,split_budget,window", [(64, 33, None), (128, 5, None), (64, 1, 100)])
def test_decode_confined_launch_matches_reference(launch, block_size, split_budget, window):
    """The steps' decode launch on a lane split: exact as the default one, over pages of 64 and
    128 slots (TMA boxes inside a page; slots past a sequence's keys hold NaN), KVP pieces
    (kv_start > 0), empty ranges, one or many items per sequence and a sliding window."""
    specs = decode_specs(block_size, window) + [(1, n - 1, 0, n) for n in (129, 700)]
    specs.append((1, 1000 + 300 - 1, 1000, 300))  # a KVP piece of 300 keys after 1000
    query, k_cache, v_cache, meta = make_batch(specs, block_size, 8, 2, 128, torch.bfloat16, seed=3)
    seq_ids = list(range(len(specs)))
    out, lse = run_decode(
        query, k_cache, v_cache, meta, seq_ids, 128**-0.5, window, split_budget,
        block_n=launch.block_n, num_warps=launch.num_warps, num_stages=launch.num_stages, use_tma=launch.use_tma,
    )  # fmt: skip
    check(out, lse, query, k_cache, v_cache, meta, seq_ids, 128**-0.5, window, 2e-2)


def test_decode_tma_boxes_need_whole_page_runs():
    """TMA boxes that would cross a page (block_n not dividing block_size) are refused."""
    specs = [(1, 99, 0, 100)]
    query, k_cache, v_cache, meta = make_batch(specs, 48, 8, 2, 128, torch.bfloat16, seed=5)
    with pytest.raises(ValueError, match="TMA K/V boxes"):
        run_decode(query, k_cache, v_cache, meta, [0], 0.1, None, 1, block_n=32, use_tma=True)


@pytest.mark.parametrize("split_budget", [1, 3, 40])
def test_decode_padding_entries_are_skipped(split_budget):
    """A CUDA graph's fixed-length list: the real entries, then -1s (more of them than the
    budget). The real rows match the reference, nothing else is written."""
    B, num_kv_heads, group, head_dim = 16, 2, 2, 32
    specs = [(1, 40, 0, 41), (1, 299, 0, 300), (1, 0, 0, 0), (1, 70, 0, 71)]
    query, k_cache, v_cache, meta = make_batch(
        specs, B, group * num_kv_heads, num_kv_heads, head_dim, torch.float32, seed=11
    )
    real = [1, 3, 0]
    out, lse = run_decode(query, k_cache, v_cache, meta, real + [-1] * 45, 0.2, None, split_budget, block_n=16)
    check(out, lse, query, k_cache, v_cache, meta, real, 0.2, None, 1e-5)


def test_decode_subset_of_mixed_batch():
    """Prefill rows (query_len > 1) and unselected decode rows are left untouched."""
    B, num_kv_heads, group, head_dim = 16, 1, 4, 32
    specs = [(1, 40, 0, 41), (5, 20, 0, 25), (1, 99, 0, 100), (1, 7, 0, 8), (3, 0, 0, 3), (1, 300, 200, 64)]
    query, k_cache, v_cache, meta = make_batch(
        specs, B, group * num_kv_heads, num_kv_heads, head_dim, torch.float32, seed=7
    )
    seq_ids = [5, 0, 3]  # not sorted; sequence 2 is a decode left out
    for split_budget in (1, 3):
        items = decode_workspace_items(3, split_budget)
        ws = (torch.empty(4, items, head_dim, device=device), torch.empty(4, items, device=device))
        out, lse = run_decode(
            query, k_cache, v_cache, meta, seq_ids, 0.2, None, split_budget, block_n=16, workspace=ws
        )
        check(out, lse, query, k_cache, v_cache, meta, seq_ids, 0.2, None, 1e-5)


def test_decode_single_items_skip_the_workspace():
    """Sequences of one item each (their keys fill the budget without splitting, or their
    tail past one item is under a quarter of it) are written straight to out / lse: the
    workspace, poisoned, is never written, and rows stay exact. With one sequence long
    enough to split, only its items go there."""
    B, num_kv_heads, group, head_dim = 16, 2, 4, 32
    equal = [(1, 63, 0, 64)] * 6  # 384 keys / budget 4 -> 96-key items (block_n 16): one per sequence
    # 304 keys / budget 4 -> 80-key items: a 100-key sequence's 20-key tail joins its one item
    tails = [(1, 99, 0, 100)] * 3 + [(1, 3, 0, 4)]
    for specs, num_written in ((equal, 0), (tails, 0), ([*equal, (1, 900, 0, 901)], None)):
        query, k_cache, v_cache, meta = make_batch(
            specs, B, group * num_kv_heads, num_kv_heads, head_dim, torch.float32, seed=len(specs)
        )
        seq_ids = list(range(len(specs)))
        items = decode_workspace_items(len(specs), 4)
        ws = (
            torch.full((8, items, head_dim), float("nan"), device=device),
            torch.full((8, items), float("nan"), device=device),
        )
        out, lse = run_decode(query, k_cache, v_cache, meta, seq_ids, 0.3, None, 4, block_n=16, workspace=ws)
        check(out, lse, query, k_cache, v_cache, meta, seq_ids, 0.3, None, 1e-5)
        written = int((~torch.isnan(ws[1][0])).sum())
        assert written == 0 if num_written == 0 else 1 < written <= items


@pytest.mark.parametrize("split_budget", [2, 5, 9, 31])
def test_decode_long_among_short_is_exact(split_budget):
    """One long sequence beside short, empty and KVP-piece ones: the long one takes most of
    the items (the split length comes from the whole batch's keys), every row stays exact."""
    B, num_kv_heads, group, head_dim = 4, 2, 4, 32
    specs = [(1, 2, 0, 3), (1, 0, 0, 0), (1, 700, 0, 701), (1, 17, 0, 18), (1, 500, 300, 150), (1, 5, 0, 6)]
    query, k_cache, v_cache, meta = make_batch(
        specs, B, group * num_kv_heads, num_kv_heads, head_dim, torch.float32, seed=split_budget
    )
    seq_ids = [2, 0, 1, 3, 4, 5]
    for window in (None, 33):
        out, lse = run_decode(query, k_cache, v_cache, meta, seq_ids, 0.3, window, split_budget, block_n=16)
        check(out, lse, query, k_cache, v_cache, meta, seq_ids, 0.3, window, 1e-5)


@pytest.mark.parametrize("num_long", [1, 4, 5])  # phase 2: 1 head x 32 items per step up to 4 decodes
def test_decode_few_sequences_of_many_items(num_long):
    """A few long decodes split into more items each than one step of phase 2's loop reads
    (40-budget: ~40 items for one sequence), merged exactly whatever the batch's shape."""
    B, num_kv_heads, group, head_dim = 16, 2, 4, 32
    specs = [(1, 1999 - 37 * i, 0, 2000 - 37 * i) for i in range(num_long)]
    query, k_cache, v_cache, meta = make_batch(
        specs, B, group * num_kv_heads, num_kv_heads, head_dim, torch.float32, seed=num_long
    )
    seq_ids = list(range(num_long))
    out, lse = run_decode(query, k_cache, v_cache, meta, seq_ids, 0.3, None, 40, block_n=16)
    check(out, lse, query, k_cache, v_cache, meta, seq_ids, 0.3, None, 1e-5)


def test_decode_no_sequences():
    query, k_cache, v_cache, meta = make_batch([(2, 0, 0, 2)], 4, 2, 1, 16, torch.float32, seed=0)
    out, lse = run_decode(query, k_cache, v_cache, meta, [], 1.0, None, 4)
    assert torch.isnan(out).all() and (lse == POISON_LSE).all()


def test_choose_split_budget():
    assert choose_split_budget(8, 132) == 33  # 2 waves of 132 SMs
    assert choose_split_budget(8, 132, head_dim=64) == 66  # small head dim: 4 waves
    assert choose_split_budget(1, 1000) == 256  # capped
    assert choose_split_budget(1024, 100) == 1  # the heads alone fill the GPU: one item each


@pytest.mark.parametrize(
    "key_dtype,cache_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)],
)
def test_write_kv_cache_matches_reference(key_dtype, cache_dtype):
    gen = torch.Generator().manual_seed(3)
    num_blocks, B, num_kv_heads, head_dim, num_tokens = 6, 5, 3, 48, 17
    slots = torch.randperm(num_blocks * B, generator=gen)[:num_tokens]
    slots[torch.tensor([0, 4, 5, 16])] = -1
    key = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(device, key_dtype)
    value = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(device, key_dtype)
    slot_mapping = slots.to(device)
    shape = (num_blocks, B, num_kv_heads, head_dim)
    caches = [torch.full(shape, float("nan"), dtype=cache_dtype, device=device) for _ in range(4)]
    write_kv_cache(key, value, caches[0], caches[1], slot_mapping)
    TorchReferenceBackend().write_kv(key, value, caches[2], caches[3], slot_mapping)
    # The interpreter rounds fp32 -> bf16 towards zero (GPU: to nearest even, like torch).
    tol = 2**-7 if key_dtype != cache_dtype and device == "cpu" else 0.0
    torch.testing.assert_close(caches[0], caches[2], atol=0, rtol=tol, equal_nan=True)
    torch.testing.assert_close(caches[1], caches[3], atol=0, rtol=tol, equal_nan=True)
    assert torch.isnan(caches[0]).sum() == (num_blocks * B - 13) * num_kv_heads * head_dim
    write_kv_cache(key[:0], value[:0], caches[0], caches[1], slot_mapping[:0])  # no tokens: no-op


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_long_context_gpu(dtype):
    """5 sequences of 50K-200K keys, 32 query / 8 KV heads, head_dim 128, block size 16."""
    B, num_kv_heads, group, head_dim = 16, 8, 4, 128
    lens = [50_000, 200_000, 123_457, 77_777, 160_001]
    specs = [(1, n - 1, 0, n) for n in lens]
    specs[3] = (1, 90_000, 12_000, 77_777)  # a KVP piece
    query, k_cache, v_cache, meta = make_batch(
        specs, B, group * num_kv_heads, num_kv_heads, head_dim, dtype, seed=11
    )
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    seq_ids = list(range(len(specs)))
    for window in (None, 4096):
        split_budget = choose_split_budget(num_kv_heads, num_sms)
        out, lse = run_decode(query, k_cache, v_cache, meta, seq_ids, head_dim**-0.5, window, split_budget)
        atol = 1e-4 if dtype == torch.float32 else 2e-2
        check(out, lse, query, k_cache, v_cache, meta, seq_ids, head_dim**-0.5, window, atol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decode_cuda_graph_replay():
    """Captured once, replayed with new kv_lens / positions: lengths are read on device."""
    B, num_kv_heads, group, head_dim = 16, 2, 4, 64
    specs = [(1, 999, 0, 1000), (1, 4999, 0, 5000)]
    query, k_cache, v_cache, meta = make_batch(
        specs, B, group * num_kv_heads, num_kv_heads, head_dim, torch.bfloat16, seed=5
    )
    tables = meta.block_tables.tolist()
    ids = torch.arange(2, dtype=torch.int32, device=device)
    out = torch.empty_like(query)
    lse = torch.empty(query.shape[:2], dtype=torch.float32, device=device)
    static = [meta.q_pos_start.clone(), meta.kv_start.clone(), meta.kv_lens.clone()]

    def call() -> None:
        paged_decode_attention(
            query, k_cache, v_cache, meta.query_start_loc, *static, meta.block_tables, ids, out, lse,
            0.125, None, 8,
        )  # fmt: skip

    call()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    for pos, start, n in [((499, 2999), (0, 0), (500, 3000)), ((1999, 4999), (1000, 0), (1000, 5000))]:
        new = AttentionMetadata.build([1, 1], list(pos), list(start), list(n), tables, [-1, -1], device)
        for dst, src in zip(static, (new.q_pos_start, new.kv_start, new.kv_lens)):
            dst.copy_(src)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        check(out, lse, query, k_cache, v_cache, new, [0, 1], 0.125, None, 2e-2)
