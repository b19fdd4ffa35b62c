"""A plain-PyTorch attention backend over the paged KV cache (the correctness reference).

Works on any device and dtype: scores, softmax and the weighted sum are computed
in float32, the output is returned in the query dtype and the LSE in float32
(natural log). Per sequence the keys held here are gathered from the block table
and attended by all its queries at once (matmul + masked softmax); long query
runs are split into chunks to bound the size of the score matrix, and each chunk
only touches the keys its mask can reach.
"""

from __future__ import annotations

import torch

from mnemosyne.layers.attention.metadata import AttentionMetadata

# Upper bound on the elements of one float32 score block [num_heads, q_chunk, k_range].
_MAX_SCORE_ELEMS = 1 << 26


class TorchReferenceBackend:
    """Exact, unfused attention; see `AttentionBackend` and `AttentionMetadata`."""

    def warm_up(
        self,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        sliding_window: int | None,
        max_num_decodes: int = 1,
        max_num_batched_tokens: int = 0,
        max_prefix_tokens: int = 0,
        exact_query_lens: tuple[int, ...] = (),
    ) -> None:
        """Nothing to compile."""

    def write_kv(
        self,
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        slot_mapping: torch.Tensor,  # [num_tokens] int64, -1 = skip
    ) -> None:
        if key.shape[0] == 0:
            return
        keep = slot_mapping >= 0  # [num_tokens]
        slots = slot_mapping[keep].long()  # [num_written]
        k_flat = k_cache.view(-1, *k_cache.shape[2:])  # [num_slots, num_kv_heads, head_dim]
        v_flat = v_cache.view(-1, *v_cache.shape[2:])
        k_flat.index_copy_(0, slots, key[keep].to(k_cache.dtype))
        v_flat.index_copy_(0, slots, value[keep].to(v_cache.dtype))

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        num_tokens, num_heads, head_dim = query.shape
        block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads {num_heads} not a multiple of num_kv_heads {num_kv_heads}")
        if sliding_window is not None and sliding_window <= 0:
            raise ValueError(f"sliding_window must be positive, got {sliding_window}")
        num_heads_per_kv = num_heads // num_kv_heads
        device = query.device

        out = torch.zeros(num_tokens, num_heads, head_dim, dtype=torch.float32, device=device)
        lse = torch.full((num_tokens, num_heads), float("-inf"), dtype=torch.float32, device=device)
        k_flat = k_cache.view(-1, num_kv_heads, head_dim)  # [num_slots, num_kv_heads, head_dim]
        v_flat = v_cache.view(-1, num_kv_heads, head_dim)
        in_block = torch.arange(block_size, device=device)  # [block_size]

        row0 = 0
        for i in range(meta.num_seqs):
            q_len = meta.query_lens_cpu[i]
            q_pos0 = meta.q_pos_start_cpu[i]
            kv0 = meta.kv_start_cpu[i]
            kv_len = meta.kv_lens_cpu[i]
            rows = row0
            row0 += q_len
            if q_len == 0 or kv_len == 0:
                continue
            num_blocks = -(-kv_len // block_size)
            blocks = meta.block_tables[i, :num_blocks].long()  # [num_blocks]
            slots = (blocks[:, None] * block_size + in_block[None, :]).reshape(-1)[:kv_len]
            k_seq = k_flat.index_select(0, slots)  # [kv_len, num_kv_heads, head_dim]
            v_seq = v_flat.index_select(0, slots)

            q_chunk = max(1, _MAX_SCORE_ELEMS // (num_heads * kv_len))
            for c0 in range(0, q_len, q_chunk):
                c1 = min(q_len, c0 + q_chunk)
                # Keys (local indices) any query of this chunk can see: [lo, hi).
                hi = min(kv_len, q_pos0 + c1 - kv0)  # last query sees keys <= its pos
                lo = 0 if sliding_window is None else max(0, q_pos0 + c0 - sliding_window + 1 - kv0)
                if hi <= lo:
                    continue
                o, s = _attend(
                    query[rows + c0 : rows + c1],
                    k_seq[lo:hi],
                    v_seq[lo:hi],
                    q_pos0 + c0,
                    kv0 + lo,
                    num_heads_per_kv,
                    scale,
                    sliding_window,
                )
                out[rows + c0 : rows + c1] = o
                lse[rows + c0 : rows + c1] = s
        return out.to(query.dtype), lse


def _attend(
    q: torch.Tensor,  # [nq, num_heads, head_dim]
    k: torch.Tensor,  # [nk, num_kv_heads, head_dim]
    v: torch.Tensor,  # [nk, num_kv_heads, head_dim]
    q_pos0: int,
    k_pos0: int,
    num_heads_per_kv: int,
    scale: float,
    sliding_window: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked attention of consecutive queries over consecutive keys, float32."""
    nq, num_heads, head_dim = q.shape
    nk, num_kv_heads, _ = k.shape
    # Query head h = g_kv * num_heads_per_kv + j uses kv head g_kv.
    qg = (
        q.float().reshape(nq, num_kv_heads, num_heads_per_kv, head_dim).permute(1, 2, 0, 3)
    )  # [Hkv, G, nq, D]
    kg = k.float().permute(1, 0, 2).unsqueeze(1)  # [Hkv, 1, nk, D]
    vg = v.float().permute(1, 0, 2).unsqueeze(1)  # [Hkv, 1, nk, D]
    scores = torch.matmul(qg, kg.transpose(-1, -2)) * scale  # [Hkv, G, nq, nk]

    q_pos = q_pos0 + torch.arange(nq, device=q.device)  # [nq]
    k_pos = k_pos0 + torch.arange(nk, device=q.device)  # [nk]
    diff = q_pos[:, None] - k_pos[None, :]  # [nq, nk]
    visible = diff >= 0
    if sliding_window is not None:
        visible &= diff < sliding_window
    scores = scores.masked_fill(~visible, float("-inf"))

    lse = torch.logsumexp(scores, dim=-1)  # [Hkv, G, nq]; -inf where no key is visible
    lse_safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    probs = torch.exp(scores - lse_safe.unsqueeze(-1))  # [Hkv, G, nq, nk]; 0 where masked
    out = torch.matmul(probs, vg)  # [Hkv, G, nq, D]
    out = out.permute(2, 0, 1, 3).reshape(nq, num_heads, head_dim)  # [nq, H, D]
    lse = lse.permute(2, 0, 1).reshape(nq, num_heads)  # [nq, H]
    return out, lse
