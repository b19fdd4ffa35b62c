"""The work items of a batch of decodes: how split-KV decode attention cuts the batch's
visible keys so that one long sequence among short ones still spreads over the whole GPU
(splitting every sequence alike would give it as few programs as the short ones). Both
phases of `decode_attention.py` derive the layout themselves from the length tensors.

Each decode sequence i has one query row r = query_start_loc[i] at global position
p = q_pos_start[i]; its key j (0 <= j < kv_lens[i]) has global position kv_start[i] + j
and lives in slot block_tables[i, j // B] * B + j % B (B = block_size). For a single
query the visible keys form one interval of local indices::

    hi = clamp(p - kv_start[i] + 1, 0, kv_lens[i])          (t <= p)
    lo = max(0, p - window + 1 - kv_start[i])  or 0         (p - t < window)
    (none visible, hi <= lo: hi = base below, an empty key loop)

The batch's visible keys are cut into work items of at most `split_keys` keys each (phase 1
runs one program per item and KV head). With span_i = hi_i - base_i the keys sequence i
reads, from its start rounded down to BLOCK_N, and S = `split_budget` (items wanted for the
whole batch)::

    base_i     = lo_i - lo_i % BLOCK_N
    split_keys = round_up(ceil(sum_i span_i / S), BLOCK_N)         (at least BLOCK_N)
    n_i        = max(1, ceil((span_i - split_keys // 4) / split_keys))   items of sequence i
    items      = sequence 0's n_0 items, then sequence 1's, ...    (in seq_ids order)
    item k of sequence i:  keys [base_i + k*split_keys, base_i + (k+1)*split_keys) & [lo_i, hi_i),
                           the last one (k = n_i - 1) up to hi_i

    seq 0 (long)  |item|item|item|item|item|item|item|item|
    seq 1 (short) |item|
    seq 2 (empty) |item|  (no visible key: lse -inf, out 0)

A tail of under a quarter of split_keys joins the item before it (the last item holds up
to 1.25 x split_keys keys) instead of making an item, and a merge, of its own: 32 decodes
of 1.8K keys at S = 33 get 1,792-key items, and each would otherwise split off 8 keys.
n_i <= ceil(span_i / split_keys), so sum_i n_i <= S + num_decode = max_items: the grid covers
every item; programs past the last item exit at once. A seq_ids entry of -1 is padding (a
CUDA graph's fixed-length list, `worker/mixed_graph.py`): it has no item and no row; padding
follows the real entries. Every program derives the layout itself from the length tensors
(a prefix sum over the batch's n_i), so nothing is planned on the host per step: one
launch serves any lengths and is CUDA-graph capturable (only S and the shapes are fixed).
"""

from __future__ import annotations

import triton
import triton.language as tl

from mnemosyne.kernels.host_math import next_power_of_2

DEFAULT_WAVES = 2  # few sequences, head dim > 64; otherwise 4 (tuning: decode_attention.py)
MAX_SPLITS = 256


def default_waves(head_dim: int) -> int:
    """Programs per SM the decode split budget aims at (tuning: decode_attention.py)."""
    return DEFAULT_WAVES if head_dim > 64 else 4


def choose_split_budget(
    num_kv_heads: int,
    num_sms: int,
    waves: int | None = None,
    max_splits: int = MAX_SPLITS,
    head_dim: int = 128,
) -> int:
    """S, the work items wanted for a whole decode batch: about `waves` waves of num_sms
    programs over the num_kv_heads heads, at least 1. It depends on neither the number of
    sequences nor their lengths (the kernel cuts whatever keys there are into ~S items of
    at least BLOCK_N keys), so one compiled variant serves every step: a budget that
    followed the lengths would change the merge's block size, and compile while serving."""
    if waves is None:
        waves = default_waves(head_dim)
    return max(1, min(-(-waves * num_sms // max(1, num_kv_heads)), max_splits))


def seq_block(num_decode: int) -> int:
    """The kernels' SEQ_BLOCK (a compile-time width of the batch scan): 128 up to 128
    decodes, then powers of two, so that few variants exist (`KernelBackend.warm_up`)."""
    return max(128, next_power_of_2(num_decode))


def decode_workspace_items(num_decode: int, split_budget: int) -> int:
    """Rows of the phase-1 workspace: an upper bound of the items (see the docstring)."""
    return split_budget + num_decode


@triton.jit
def visible_span(
    qpos_ptr, kv_start_ptr, kv_lens_ptr, seq, window, HAS_WINDOW: tl.constexpr, BLOCK_N: tl.constexpr
):
    """(lo, hi, base) of the local keys the decode of sequence(s) `seq` sees: [lo, hi), and
    lo rounded down to BLOCK_N. When it sees none, hi = base <= lo, so that the key loop
    [base, hi) is empty: a piece that ends before the window starts (lo > kv_len) may end
    inside lo's tile, and a tile without a visible key would give m = -inf, exp2(nan)."""
    q_pos = tl.load(qpos_ptr + seq).to(tl.int64)
    kv0 = tl.load(kv_start_ptr + seq).to(tl.int64)
    kv_len = tl.load(kv_lens_ptr + seq).to(tl.int64)
    hi = tl.minimum(tl.maximum(q_pos - kv0 + 1, 0), kv_len)
    lo = hi * 0
    if HAS_WINDOW:
        lo = tl.maximum(q_pos - window + 1 - kv0, 0)
    base = lo - lo % BLOCK_N
    hi = tl.where(hi > lo, hi, base)
    return lo, hi, base


@triton.jit
def work_items(
    qpos_ptr, kv_start_ptr, kv_lens_ptr, seq_ids_ptr, num_decode, split_budget, window,
    HAS_WINDOW: tl.constexpr, BLOCK_N: tl.constexpr, SEQ_BLOCK: tl.constexpr,
):  # fmt: skip
    """The item layout (module docstring) of the whole batch, as SEQ_BLOCK-wide vectors:
    (n [items per sequence], first [its first item], split_keys)."""
    offs = tl.arange(0, SEQ_BLOCK)
    seqs = tl.load(seq_ids_ptr + offs, mask=offs < num_decode, other=-1).to(tl.int64)
    mask = seqs >= 0  # -1: past num_decode, or a padding entry (no item)
    seqs = tl.maximum(seqs, 0)
    lo, hi, base = visible_span(qpos_ptr, kv_start_ptr, kv_lens_ptr, seqs, window, HAS_WINDOW, BLOCK_N)
    span = tl.where(mask & (hi > lo), hi - base, 0)  # [SEQ_BLOCK] int64
    total = tl.sum(span, 0)
    split_keys = tl.maximum(tl.cdiv(tl.cdiv(total, split_budget), BLOCK_N), 1) * BLOCK_N
    n = tl.where(mask, tl.maximum(tl.cdiv(span - split_keys // 4, split_keys), 1), 0).to(tl.int32)
    first = tl.cumsum(n, 0) - n
    return n, first, split_keys
