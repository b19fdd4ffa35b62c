"""Split-KV attention of prefill chunks (1 .. any queries) over the paged KV cache, with the LSE.

Same semantics as `TorchReferenceBackend.forward` (see `AttentionMetadata`) for the
sequences covered by a list of query tiles (`paged_prefill.plan_query_tiles`). Phase 1,
grid (num_tiles, num_kv_heads, num_splits); one program = one query tile x one KV head x
one piece of the tile's keys::

    tile k: sequence s = tile_seq[k], first query offset q0 = tile_q_offset[k]
            tokens  u = 0 .. n_q-1,  n_q = min(BLOCK_Q, query_len[s] - q0)
            packed query row r = qsl[s] + q0 + u, global position p = q_pos_start[s] + q0 + u

    M dim: the G = num_heads // num_kv_heads query heads of KV head g under each token
            m = u * G + h   ->  token u = m // G, query head g * G + h
            (M = BLOCK_Q * G padded to a power of two >= 16; each K/V tile is read once
            for all of them; padded rows are never stored)

    key j (0 <= j < kv_len[s]): global position kv_start[s] + j,
            cache slot block_tables[s, j // B] * B + j % B  (gathered per key: a tile may span pages)

    row m sees key j  iff  kv_start + j <= p  and (no window or p - (kv_start + j) < W)

Local coordinates: rel = p - kv_start. The tile walks keys [lo, hi) (hi = min(kv_len,
last rel + 1); lo = max(0, first rel - W + 1) with a window, else 0) in n_steps steps of
BLOCK_N keys, and split `s` of num_splits takes the steps [s * per, (s + 1) * per),
per = ceil(n_steps / num_splits); steps inside the keys every row sees skip the mask::

    step:   0 ... i_a ............................. i_b ......... n_steps
            | masked head |   fully visible, unmasked   | masked tail (the chunk's own keys: causal)
    split:  |<---- split 0 ---->|<---- split 1 ---->|<---- split 2 ---->|  (trailing ones may be empty)

So the chunk's causal part is the masked tail of the last non-empty split: one kernel.
Every length comes from device tensors (graph-capturable; only num_splits and the shapes
are fixed by the host). Online softmax in float32 with exp2 of log2(e)-scaled scores.

num_splits == 1: phase 1 writes out / lse (natural log) directly. Otherwise it writes
each split's normalised partial and LSE to a float32 workspace indexed by packed row,
[num_tokens, num_heads, num_splits, (head_dim)], and phase 2, grid (len(merge_rows),
cdiv(num_heads, BLOCK_H)), merges the splits of each covered row exactly (`merge_attn.merge_splits`).
Rows that see no key get out = 0 and lse = -inf. Rows of sequences not covered by a tile
are not touched. An empty split writes only its partial LSE (-inf), not its output.

CUDA graphs (`layers/attention/static_plan.py`) launch a fixed grid: tile_seq = -1 marks a
padding tile (no query, no key, no store), merge_rows = -1 a padding merge row, and
`min_split_keys` (per = max(per, min_split_keys // BLOCK_N)) keeps a short sequence in its
first splits whatever the fixed split count.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mnemosyne.kernels.host_math import next_power_of_2
from mnemosyne.kernels.merge_attn import merge_splits
from mnemosyne.kernels.paged_prefill import default_block_q, kv_steps, query_tile, store_tile, tile_step_range

_LOG2E = 1.4426950408889634
MAX_SPLITS = 128
# Fewest keys per split worth a partial: each split also writes and re-reads M x D floats.
MIN_SPLIT_KEYS = 1024
# Programs per SM the split count aims at (H200, c = 128 after 128K keys: 4 -> 1.29 ms,
# 2 -> 1.44 ms; benchmarks/results/chunk_sweep_h200_*.json, "tuning").
DEFAULT_WAVES = 4


def choose_chunk_splits(
    num_tiles: int,
    num_kv_heads: int,
    max_keys: int,
    num_sms: int,
    waves: int = DEFAULT_WAVES,
    min_split_keys: int = MIN_SPLIT_KEYS,
    max_splits: int = MAX_SPLITS,
    tile_keys: int | None = None,
) -> int:
    """Splits along the keys so that num_tiles * num_kv_heads * splits programs fill about
    `waves` programs per SM, each split keeping >= min_split_keys of the longest sequence's
    keys; 1 when the tiles alone fill the GPU.

    tile_keys (the keys of every tile's sequence, summed over the tiles) balances uneven
    launches: the longest sequence gets enough splits that one of its programs walks no
    more keys than the launch's average program (a sequence uses only the splits its length
    needs, `min_split_keys`). Without it, a long prefix's few tiles beside many short tiles
    (a 64-token chunk after 408K keys beside a 2340-token prompt) got 2 splits and made the
    step 3x its prediction (H200 serving trace, 1B, 2026-11-30)."""
    programs = max(1, num_tiles * num_kv_heads)
    want = -(-waves * num_sms // programs)
    if tile_keys is not None and max_keys > 0:
        per_program = max(min_split_keys, -(-tile_keys * num_kv_heads // (waves * num_sms)))
        want = max(want, -(-max_keys // per_program))
    return max(1, min(want, max_keys // min_split_keys, max_splits))


# Arguments that change from step to step: the split count, the workspace strides that follow
# it, and the block table's width. Triton would otherwise compile a variant per class of
# their values (== 1, multiple of 16, other; tests/test_no_recompile.py) while serving.
@triton.jit(do_not_specialize=[
    "stride_ot", "stride_oh", "stride_os", "stride_lt", "stride_lh", "stride_ls", "stride_bts", "num_splits",
    "min_split_steps",
])  # fmt: skip
def _chunk_split_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, l_ptr,  # o / l: out / lse (DIRECT) or the split workspace
    qsl_ptr, q_pos_ptr, kv_start_ptr, kv_lens_ptr, bt_ptr, tile_seq_ptr, tile_off_ptr,
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ot, stride_oh, stride_os, stride_od,
    stride_lt, stride_lh, stride_ls,
    stride_bts, stride_btb,
    qk_scale, window, num_splits, min_split_steps,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,  # head_dim, padded to a power of two >= 16
    G: tl.constexpr,  # query heads per KV head
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr,  # block_size of the cache
    USE_WINDOW: tl.constexpr, IEEE: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    if tl.load(tile_seq_ptr + tile) < 0:  # a padding tile (a CUDA graph's fixed grid): before
        return  # any prologue, so that it frees its SM slot at once
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq, kv_len, rel0, n_q, head, rows, m_valid, io_mask, q, q_rel = query_tile(
        q_ptr, qsl_ptr, q_pos_ptr, kv_start_ptr, kv_lens_ptr, tile_seq_ptr, tile_off_ptr,
        stride_qt, stride_qh, stride_qd, tile, kv_head, HEAD_DIM, BLOCK_D, G, BLOCK_Q, BLOCK_M,
    )  # fmt: skip
    lo, hi, i_a, i_b, s0, s1 = tile_step_range(
        rel0, n_q, kv_len, window, split, num_splits, min_split_steps, BLOCK_N, USE_WINDOW, False
    )

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    bt_row = bt_ptr + seq.to(tl.int64) * stride_bts
    k_head = k_ptr + kv_head * stride_kh
    v_head = v_ptr + kv_head * stride_vh
    # [s0, s1) cut by the masked head [0, i_a), the unmasked middle [i_a, i_b), the masked tail.
    acc, l_i, m_i = kv_steps(
        acc, l_i, m_i, s0, tl.minimum(i_a, s1), q, q_rel, lo, hi, window, bt_row, stride_btb, k_head, v_head,
        stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd, qk_scale,
        HEAD_DIM, BLOCK_D, BLOCK_N, PAGE, True, USE_WINDOW, IEEE, INTERPRET,
    )  # fmt: skip
    acc, l_i, m_i = kv_steps(
        acc, l_i, m_i, tl.maximum(i_a, s0), tl.minimum(i_b, s1), q, q_rel, lo, hi, window, bt_row, stride_btb,
        k_head, v_head, stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd, qk_scale,
        HEAD_DIM, BLOCK_D, BLOCK_N, PAGE, False, USE_WINDOW, IEEE, INTERPRET,
    )  # fmt: skip
    acc, l_i, m_i = kv_steps(
        acc, l_i, m_i, tl.maximum(i_b, s0), s1, q, q_rel, lo, hi, window, bt_row, stride_btb, k_head, v_head,
        stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd, qk_scale,
        HEAD_DIM, BLOCK_D, BLOCK_N, PAGE, True, USE_WINDOW, IEEE, INTERPRET,
    )  # fmt: skip

    # An empty split (a short sequence under a fixed split count) writes only its LSE, -inf:
    # the merge does not read its output.
    io_mask = io_mask & ((s1 > s0) | (num_splits == 1))
    store_tile(
        acc, l_i, m_i, o_ptr, l_ptr, rows, head, split, io_mask, m_valid,
        stride_ot, stride_oh, stride_os, stride_od, stride_lt, stride_lh, stride_ls, BLOCK_D,
    )  # fmt: skip


def check_chunk_args(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    sliding_window: int | None,
    num_splits: int,
    merge_rows: torch.Tensor | None,
) -> None:
    """The checks every chunk kernel's wrapper makes (ValueError naming the problem)."""
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads, kv_head_dim = k_cache.shape[2], k_cache.shape[3]
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads {num_heads} not a multiple of num_kv_heads {num_kv_heads}")
    if kv_head_dim != head_dim or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"cache shapes {tuple(k_cache.shape)}, {tuple(v_cache.shape)} vs head_dim {head_dim}"
        )
    if out.shape != query.shape or out.dtype != query.dtype:
        raise ValueError(f"out must be {tuple(query.shape)} {query.dtype}")
    if lse.shape != (num_tokens, num_heads) or lse.dtype != torch.float32:
        raise ValueError(f"lse must be ({num_tokens}, {num_heads}) float32")
    if sliding_window is not None and sliding_window <= 0:
        raise ValueError(f"sliding_window must be positive, got {sliding_window}")
    if not 1 <= num_splits <= MAX_SPLITS or (num_splits > 1 and merge_rows is None):
        raise ValueError(
            f"num_splits must be in [1, {MAX_SPLITS}] (and > 1 needs merge_rows), got {num_splits}"
        )


def split_outputs(
    query: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    num_splits: int,
    workspace: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """Where phase 1 writes: (out, lse) themselves for one split, else the split workspace
    (allocated when None); with the (token, head, split, dim) / (token, head, split) strides."""
    if num_splits == 1:
        return out, lse, (*out.stride()[:2], 0, out.stride(2)), (*lse.stride(), 0)
    num_tokens, num_heads, head_dim = query.shape
    if workspace is None:
        ws_shape = (num_tokens, num_heads, num_splits)
        workspace = (
            torch.empty(*ws_shape, head_dim, dtype=torch.float32, device=query.device),
            torch.empty(ws_shape, dtype=torch.float32, device=query.device),
        )
    o_ws, l_ws = workspace
    if o_ws.shape != (num_tokens, num_heads, num_splits, head_dim) or l_ws.shape != o_ws.shape[:3]:
        raise ValueError(f"workspace shapes {tuple(o_ws.shape)}, {tuple(l_ws.shape)} do not fit")
    if o_ws.stride(-1) != 1:
        raise ValueError("the workspace's head dim must be contiguous")
    return o_ws, l_ws, o_ws.stride(), l_ws.stride()


def tile_launch(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    num_heads_per_kv: int,
    block_q: int | None,
    num_warps: int | None,
    num_stages: int | None,
) -> tuple[int, int, int, int, int]:
    """(block_q, block_m, block_d, num_warps, num_stages) of a chunk kernel's launch, the
    Nones chosen from the dtype and tile size: 4 warps for 16-bit tiles of at most 128 x 128
    (no register spills on sm_90; H200, c = 32 / 128 after 128K keys: per-key kernel 4 warps
    0.30 / 1.24 ms, 8 warps 0.39 / 1.44 ms; page-aligned kernel 0.20 / 0.67 ms, 0.27 / 1.04 ms)."""
    half = query.element_size() <= 2
    if block_q is None:
        block_q = default_block_q(num_heads_per_kv, query.dtype)
    block_m = max(16, next_power_of_2(block_q * num_heads_per_kv))
    block_d = max(16, next_power_of_2(query.shape[-1]))
    if num_warps is None:
        num_warps = 4 if half and block_m * block_d <= 128 * 128 else 8
    if num_stages is None:
        num_stages = 3 if half else 2
    return block_q, block_m, block_d, num_warps, num_stages


def chunk_splitkv_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    q_pos_start: torch.Tensor,  # [num_seqs] int64
    kv_start: torch.Tensor,  # [num_seqs] int64
    kv_lens: torch.Tensor,  # [num_seqs] int32
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    tile_seq: torch.Tensor,  # [num_tiles] int32
    tile_q_offset: torch.Tensor,  # [num_tiles] int32
    out: torch.Tensor,  # [num_tokens, num_heads, head_dim], query dtype
    lse: torch.Tensor,  # [num_tokens, num_heads] float32
    scale: float,
    sliding_window: int | None,
    num_splits: int = 1,
    merge_rows: torch.Tensor | None = None,  # [num_covered_rows] int32: the tiles' packed rows
    block_q: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
    min_split_keys: int = 0,  # each split takes at least this many keys (rounded down to
    # whole steps): a sequence shorter than num_splits * min_split_keys leaves splits empty
) -> None:
    """Attention of the tiles' query rows over the keys held in the paged cache; writes
    `out` and `lse` (natural log, -inf where a row sees no key) for those rows only.

    num_splits > 1 needs `merge_rows` (every packed row of the covered sequences) and uses
    `workspace` = (partial out [num_tokens, num_heads, num_splits, head_dim] float32,
    partial lse [num_tokens, num_heads, num_splits] float32), allocated here when None.
    block_q must equal the one given to `plan_query_tiles`; None means
    `default_block_q(num_heads // num_kv_heads, query.dtype)`. block_n / num_warps /
    num_stages None: chosen from the dtype and tile size (no register spills on sm_90).
    Launch only: no host sync."""
    check_chunk_args(query, k_cache, v_cache, out, lse, sliding_window, num_splits, merge_rows)
    num_tokens, num_heads, head_dim = query.shape
    page, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    num_tiles = tile_seq.shape[0]
    if num_tiles == 0 or num_tokens == 0:
        return
    num_heads_per_kv = num_heads // num_kv_heads
    block_q, block_m, block_d, num_warps, num_stages = tile_launch(
        query, num_heads_per_kv, block_q, num_warps, num_stages
    )
    block_n = max(16, next_power_of_2(block_n or (64 if query.element_size() <= 2 else 32)))
    o_ws, l_ws, o_strides, l_strides = split_outputs(query, out, lse, num_splits, workspace)
    _chunk_split_kernel[(num_tiles, num_kv_heads, num_splits)](
        query, k_cache, v_cache, o_ws, l_ws,
        query_start_loc, q_pos_start, kv_start, kv_lens, block_tables, tile_seq, tile_q_offset,
        *query.stride(), *k_cache.stride(), *v_cache.stride(), *o_strides, *l_strides,
        *block_tables.stride(),
        scale * _LOG2E, 0 if sliding_window is None else sliding_window, num_splits,
        max(1, min_split_keys // block_n),
        HEAD_DIM=head_dim, BLOCK_D=block_d, G=num_heads_per_kv,
        BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=block_n,
        PAGE=page, USE_WINDOW=sliding_window is not None, IEEE=query.dtype == torch.float32,
        INTERPRET=triton.knobs.runtime.interpret, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    if num_splits > 1:
        assert merge_rows is not None
        merge_splits(o_ws, l_ws, out, lse, merge_rows, num_splits)


__all__ = [
    "MAX_SPLITS",
    "check_chunk_args",
    "choose_chunk_splits",
    "chunk_splitkv_attention",
    "split_outputs",
    "tile_launch",
]
