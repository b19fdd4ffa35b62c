"""The cuDNN chunk path's exact-length graphs (kernels/cudnn_prefill.py, `DenseChunk.exact_keys`):
which keys each call reads and in which memory layout, that the merged result is still the
attention over every key, and that the graphs built at start-up cover every exact call.

On CPU the cuDNN call is replaced by its contract in torch, wrapped by a spy that checks the
layout PyTorch picks its graph by (q, k, v all in BSHD memory: ragged; q in BHSD: exact).
On CUDA the spy wraps the real call."""

from __future__ import annotations

import pytest
import torch

from mnemosyne.kernels import cudnn_prefill
from mnemosyne.kernels.cudnn_plans import chunk_call_shapes, cudnn_chunk_lens, reachable_shapes
from mnemosyne.kernels.cudnn_prefill import DenseChunk, Part, dense_chunk_attention, prefix_parts
from mnemosyne.layers.attention.kernel_backend import KernelBackend
from mnemosyne.layers.attention.metadata import AttentionMetadata
from mnemosyne.layers.attention.reference import TorchReferenceBackend

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SEGMENT, GRANULE = 128, 32  # keys per prefix segment, the exact granule (the engine's: 128K, 16K)


def _bshd_memory(t: torch.Tensor) -> bool:
    return t.transpose(1, 2).is_contiguous()


def _math_cudnn(q, k, v, causal, scale):
    """The cuDNN call's contract in plain torch."""
    s = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * scale
    if causal:
        nq, nk = s.shape[-2:]
        s = s.masked_fill(torch.ones(nq, nk, dtype=torch.bool, device=s.device).triu(nk - nq + 1), float("-inf"))
    return torch.einsum("bhqk,bhkd->bhqd", torch.softmax(s, -1), v.float()).to(q.dtype), torch.logsumexp(s, -1)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bool, int, int, bool]]:
    """Every cuDNN call as (exact, queries, keys, causal), its layout checked."""
    inner = cudnn_prefill._cudnn if DEVICE.type == "cuda" else _math_cudnn
    seen: list[tuple[bool, int, int, bool]] = []

    def spy(q, k, v, causal, scale):
        assert _bshd_memory(k) and _bshd_memory(v)  # views of the cache (or repeated heads) as always
        exact = not _bshd_memory(q)
        assert not exact or q.is_contiguous()  # exact: BHSD memory
        seen.append((exact, q.shape[2], k.shape[2], causal))
        return inner(q, k, v, causal, scale)

    monkeypatch.setattr(cudnn_prefill, "_cudnn", spy)
    return seen


def test_prefix_parts_with_exact_keys_cover_the_keys_once() -> None:
    for num_prefix, own in ((0, True), (31, True), (32, True), (300, True), (256, False), (1000, True)):
        chunk = DenseChunk(0, 0, 9, num_prefix, own, (0, 100), exact_keys=GRANULE)
        parts = prefix_parts(chunk, 16, SEGMENT)
        keys = [k for part in parts for k in range(part.k0, part.k1)]
        assert keys == list(range(num_prefix + (9 if own else 0)))
        for part in parts:
            n = part.k1 - part.k0
            if part.causal:
                assert part.exact and n == 9
            elif part.exact:
                assert n % GRANULE == 0 and n <= SEGMENT
            else:  # the keys past the last multiple of the granule
                assert n < GRANULE and part.k1 == num_prefix
    assert prefix_parts(DenseChunk(0, 0, 9, 300, True, (0, 100)), 16, SEGMENT)[-1] == Part(300, 309, True, False)
    with pytest.raises(ValueError, match="one prefix split"):
        prefix_parts(DenseChunk(0, 0, 9, 300, True, (0, 100), prefix_splits=2, exact_keys=GRANULE), 16, SEGMENT)


def _batch(c: int, prefix: int, own: bool, shuffled: bool, dtype: torch.dtype):
    h, hkv, d, block = 8, 2, 64, 16
    kv_len = prefix + (c if own else 0)
    g = torch.Generator().manual_seed(prefix + c)
    num_blocks = -(-kv_len // block) + 2
    ids = torch.randperm(num_blocks, generator=g) if shuffled else torch.arange(num_blocks)
    table = ids[: -(-kv_len // block)].tolist()
    k_cache = torch.randn(num_blocks, block, hkv, d, generator=g).to(dtype).to(DEVICE)
    v_cache = torch.randn(num_blocks, block, hkv, d, generator=g).to(dtype).to(DEVICE)
    query = torch.randn(c, h, d, generator=g).to(dtype).to(DEVICE)
    q0 = prefix if own else kv_len + 5  # not own: an older KVP piece, every key before the queries
    meta = AttentionMetadata.build([c], [q0], [0], [kv_len], [table], [-1] * c, DEVICE)
    run = (table[0], 1 if shuffled else len(table))
    return query, k_cache, v_cache, meta, DenseChunk(0, 0, c, prefix, own, run, exact_keys=GRANULE)


@pytest.mark.parametrize("prefix,own,shuffled", [(300, True, False), (256, True, True), (20, True, False),
                                                 (333, False, True), (0, True, False)])  # fmt: skip
def test_exact_chunk_matches_the_reference(calls, prefix: int, own: bool, shuffled: bool) -> None:
    """Exact segments, the ragged rest, the own keys: merged, the attention over every key,
    each call in the layout of its graph."""
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    c = 9
    query, k_cache, v_cache, meta, chunk = _batch(c, prefix, own, shuffled, dtype)
    out, lse = torch.full_like(query, float("nan")), torch.full((c, query.shape[1]), float("nan"), device=DEVICE)
    dense_chunk_attention(query, k_cache, v_cache, meta.block_tables[0], chunk, 64**-0.5, SEGMENT, out, lse)
    ref_meta = AttentionMetadata(**{**meta.__dict__, "backend_plan": None})
    ref_out, ref_lse = TorchReferenceBackend().forward(query.float(), k_cache.float(), v_cache.float(), ref_meta, 64**-0.5)
    atol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.float(), ref_out, atol=atol, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=atol, rtol=0)
    expected = [(p.exact, 9 if p.causal else 4 * c, p.k1 - p.k0, p.causal) for p in prefix_parts(chunk, 16, SEGMENT)]
    assert calls == expected


def _backend(exact_query_lens: frozenset[int]) -> KernelBackend:
    backend = KernelBackend(4, 128, torch.bfloat16, torch.device("cpu"), use_cudnn=True)
    backend.num_sms = 132  # an H200's: the split rule depends on it
    backend.exact_query_lens = exact_query_lens
    return backend


def _meta(c: int, prefix: int) -> AttentionMetadata:
    n = -(-(c + prefix) // 64)
    return AttentionMetadata.build([c], [prefix], [0], [c + prefix], [list(range(n))], [-1] * c, torch.device("cpu"))


def test_only_chunks_of_an_exact_length_with_one_prefix_split_take_exact_graphs() -> None:
    backend = _backend(frozenset({4096, 512}))
    (chunk,) = backend.host_plan(_meta(4096, 300_000), 8, None, 64).dense
    assert chunk.exact_keys == backend.exact_segment_keys and chunk.prefix_splits == 1
    (chunk,) = backend.host_plan(_meta(4000, 300_000), 8, None, 64).dense
    assert chunk.exact_keys == 0
    (chunk,) = backend.host_plan(_meta(512, 300_000), 8, None, 64).dense  # few programs: a split prefix
    assert chunk.prefix_splits > 1 and chunk.exact_keys == 0


def test_the_graphs_built_cover_every_exact_chunk() -> None:
    """Chunks of the exact length after prefixes up to the longest: every call's shape was
    built (exact ones and the ragged rest), so none falls back to Triton."""
    backend = _backend(frozenset({4096}))
    max_prefix, segment = 600_000, backend.dense_segment_tokens

    def cheaper(c: int, keys: int, tiles: bool) -> bool:
        return backend.dense_is_cheaper(c, keys, 8, tiles)

    lens = cudnn_chunk_lens(cheaper, 8192, max_prefix)
    built = reachable_shapes(lens, 4, 8, max_prefix, segment, 132, [4096], backend.exact_segment_keys)
    exact = {s for s in built if s.exact}
    assert len(exact) == 1 + segment // backend.exact_segment_keys  # the own keys, 8 segment lengths
    backend.cudnn_shapes = frozenset(built)
    for prefix in (16_384, 20_000, 100_000, 131_072, 229_376, 300_001, max_prefix - 4096):  # cuDNN's, by cost
        (chunk,) = backend.host_plan(_meta(4096, prefix), 8, None, 64).dense
        assert chunk.exact_keys > 0
        assert set(chunk_call_shapes(chunk, 4, 8, 64, segment)) <= built
    backend.cudnn_shapes = frozenset(built - exact)  # exact graphs not built: the ragged ones
    (chunk,) = backend.host_plan(_meta(4096, 229_376), 8, None, 64).dense
    assert chunk.exact_keys == 0
