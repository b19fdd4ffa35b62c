"""The warp-specialized Gluon chunk kernel (kernels/chunk_ws_attention.py) against
TorchReferenceBackend through test_kernel_prefill's `run_case` (shuffled blocks, poisoned
outputs and workspace), on sm_90 only (Gluon has no interpreter): mixed batches, KVP pieces
(kv_start > 0), sliding windows, long prefixes over many device-chosen splits, padding
tiles anywhere in the tile list, random batches, and a CUDA-graph replay with new lengths.

Unused cache slots hold a finite value here, not NaN: the kernel reads the tail of a
sequence's last page with P = 0 (its module docstring; the engine's caches start zeroed)."""

from __future__ import annotations

import random

import pytest
import torch
from test_kernel_prefill import DEVICE, MIXED, SPLIT_SEQS, Seq, prefill, run_case

from mnemosyne.kernels.chunk_tma_attention import chunk_tma_attention
from mnemosyne.kernels.chunk_ws_attention import WS_PAGE, chunk_ws_attention, ws_supported
from mnemosyne.kernels.paged_prefill import default_block_q, plan_query_tiles

needs_sm90 = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9, reason="needs sm_90"
)
pytestmark = [pytest.mark.gpu, needs_sm90]


def ws_kernel(pad_front: int = 0, pad_back: int = 0):
    """chunk_ws_attention with the tile list padded by -1 tiles (a CUDA graph's fixed grid)."""

    def kernel(*args: object, block_n: int | None = None, **kw: object) -> None:
        del block_n  # the kernel's steps are one page
        a = list(args)
        front = torch.full((pad_front,), -1, dtype=torch.int32, device=DEVICE)
        back = torch.full((pad_back,), -1, dtype=torch.int32, device=DEVICE)
        a[8] = torch.cat([front, a[8], back])  # type: ignore[list-item]
        a[9] = torch.cat([front * 0, a[9], back * 0])  # type: ignore[list-item]
        chunk_ws_attention(*a, **kw)  # type: ignore[arg-type]

    return kernel


def run_ws(seqs, num_heads, num_kv_heads, head_dim, dtype, window, pad=(0, 0), **kw) -> None:
    run_case(seqs, num_heads, num_kv_heads, head_dim, WS_PAGE, dtype, window, kernel=ws_kernel(*pad),
             unused_slots=0.5, **kw)  # fmt: skip


# (num_heads, num_kv_heads, head_dim, dtype, window, num_splits)
CONFIGS = [
    (32, 8, 128, torch.bfloat16, None, 1),  # Llama-3-8B heads
    (32, 8, 128, torch.bfloat16, 7, 4),  # window, splits
    (32, 8, 64, torch.float16, None, 8),  # Llama-3.2-1B heads, fp16
    (8, 1, 128, torch.bfloat16, 50, 3),  # GQA 8
    (4, 4, 64, torch.bfloat16, 3, 2),  # GQA 1: 128-token tiles
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "h{}kv{}d{}-{}-w{}-s{}".format(*c))
@pytest.mark.parametrize("seqs", [MIXED, SPLIT_SEQS], ids=["mixed", "split_seqs"])
def test_batches(config, seqs):
    num_heads, num_kv_heads, head_dim, dtype, window, splits = config
    run_ws(seqs, num_heads, num_kv_heads, head_dim, dtype, window, block_q=None, num_splits=splits, seed=1)


@pytest.mark.parametrize("window", [None, 1000])
@pytest.mark.parametrize("num_splits", [1, 16, 32])
def test_long_prefixes(window, num_splits):
    # Chunks of 17-64 queries after 5K-20K keys beside short prompts and a KVP piece: the
    # device gives the long prefixes most of the splits.
    seqs = [prefill(64, 20000), prefill(17, 5003), prefill(100), Seq(33, 9000, 4100, 4933), prefill(1, 700)]
    run_ws(seqs, 32, 8, 128, torch.bfloat16, window, block_q=None, num_splits=num_splits, seed=num_splits)


def test_padding_tiles_anywhere():
    run_ws(SPLIT_SEQS, 32, 8, 128, torch.bfloat16, None, pad=(2, 3), block_q=None, num_splits=5, seed=4)
    run_ws(MIXED, 32, 8, 64, torch.bfloat16, 9, pad=(0, 4), block_q=None, num_splits=1, seed=5)


@pytest.mark.parametrize("seed", range(6))
def test_random_batches(seed):
    rng = random.Random(seed)
    seqs = []
    for _ in range(rng.randint(1, 4)):
        c = rng.choice([1, 2, rng.randint(3, 40), rng.randint(41, 300)])
        prefix = rng.randrange(1, 3000, 2)
        if rng.random() < 0.3:
            kv_start = rng.randint(1, prefix)
            seqs.append(Seq(c, prefix, prefix + c - kv_start, kv_start))
        else:
            seqs.append(prefill(c, prefix))
    num_kv_heads = rng.choice([1, 2, 8])
    num_heads = num_kv_heads * rng.choice([1, 4, 8])
    run_ws(seqs, num_heads, num_kv_heads, rng.choice([64, 128]), torch.bfloat16, rng.choice([None, rng.randint(1, 900)]),
           block_q=None, num_splits=rng.choice([1, 2, 5, 32]), seed=seed)  # fmt: skip


def test_supported_layouts():
    dev = torch.device("cuda")
    assert ws_supported(128, torch.bfloat16, 64, 4, 32, dev)
    assert not ws_supported(128, torch.float32, 64, 4, 32, dev)  # fp32: no 16-bit wgmma
    assert not ws_supported(80, torch.bfloat16, 64, 4, 32, dev)  # not a TMA box
    assert not ws_supported(128, torch.bfloat16, 16, 4, 32, dev)  # steps are 64-key pages
    assert not ws_supported(128, torch.bfloat16, 64, 4, 64, dev)  # 256 rows
    with pytest.raises(ValueError, match="does not serve"):
        run_ws(MIXED, 8, 2, 128, torch.float32, None, block_q=None)


def test_cuda_graph_replay_matches_tma_kernel():
    """Captured once (a fixed tile list with padding, 16 splits + merge), replayed with new
    positions and lengths: the device picks the splits each replay."""
    c, h, hkv, d, nb, splits = 48, 32, 8, 128, 700, 16
    gen = torch.Generator(device="cuda").manual_seed(0)
    k = torch.randn(nb, WS_PAGE, hkv, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(nb, WS_PAGE, hkv, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    q = torch.randn(c, h, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    bt = torch.randperm(nb, device="cuda", generator=gen).to(torch.int32)[None]
    qsl = torch.tensor([0, c], dtype=torch.int32, device="cuda")
    q_pos, kv_start = torch.tensor([5000], device="cuda"), torch.zeros(1, dtype=torch.long, device="cuda")
    kv_lens = torch.tensor([5000 + c], dtype=torch.int32, device="cuda")
    block_q = default_block_q(h // hkv, torch.bfloat16)
    seqs, offs = plan_query_tiles([c], [0], block_q)
    ts = torch.tensor(seqs + [-1, -1], dtype=torch.int32, device="cuda")
    to = torch.tensor(offs + [0, 0], dtype=torch.int32, device="cuda")
    rows = torch.arange(c, dtype=torch.int32, device="cuda")
    ws = (torch.empty(c, h, splits, d, device="cuda"), torch.empty(c, h, splits, device="cuda"))

    def call(kernel, out: torch.Tensor, lse: torch.Tensor, tiles=(ts, to), **kw: object) -> None:
        kernel(q, k, v, qsl, q_pos, kv_start, kv_lens, bt, *tiles, out, lse, d**-0.5, None,
               num_splits=splits, merge_rows=rows, block_q=block_q, workspace=ws, **kw)  # fmt: skip

    out, lse = torch.empty_like(q), torch.empty(c, h, device="cuda")
    call(chunk_ws_attention, out, lse)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call(chunk_ws_attention, out, lse)
    ref_ws = (torch.empty_like(ws[0]), torch.empty_like(ws[1]))
    for pos, start in [(9000, 0), (40000, 3000), (70, 0)]:
        q_pos.fill_(pos)
        kv_start.fill_(start)
        kv_lens.fill_(pos + c - start)
        graph.replay()
        ref_out, ref_lse = torch.empty_like(q), torch.empty(c, h, device="cuda")
        chunk_tma_attention(q, k, v, qsl, q_pos, kv_start, kv_lens, bt, ts[: len(seqs)], to[: len(seqs)],
                            ref_out, ref_lse, d**-0.5, None, num_splits=splits, merge_rows=rows,
                            block_q=block_q, workspace=ref_ws)  # fmt: skip
        torch.testing.assert_close(out.float(), ref_out.float(), atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(lse, ref_lse, atol=2e-3, rtol=2e-3)
