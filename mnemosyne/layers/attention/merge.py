"""Exact merging of partial attention results computed over disjoint key sets.

For one query row and one head, attention over a key set S is

    lse_S = log sum_{t in S} exp(s_t)                 (s_t = scale * q.k_t, masked keys excluded)
    out_S = sum_{t in S} exp(s_t - lse_S) v_t

If S = A u B with A and B disjoint, then exp(lse_S) = exp(lse_A) + exp(lse_B) and

    out_S = (exp(lse_A) out_A + exp(lse_B) out_B) / (exp(lse_A) + exp(lse_B))

because exp(lse_A) out_A = sum_{t in A} exp(s_t) v_t (the unnormalised numerator),
and the numerators of disjoint sets add up. The identity is exact in real
arithmetic, so merging the partials of any partition of the keys gives the same
result as attending over all keys at once (up to float rounding). For stability
every exponent is shifted by m = max(lse_A, lse_B) (online softmax)::

    w_X = exp(lse_X - m)        (in (0, 1], one of them is exactly 1)
    out = (w_A out_A + w_B out_B) / (w_A + w_B)
    lse = m + log(w_A + w_B)

A partial whose row saw no key has lse = -inf and contributes w = 0; when every
partial is -inf the merged row is out = 0, lse = -inf (m is replaced by 0 there
so that no inf - inf = NaN appears). Weights are computed in float32 and the
output is cast back to the input dtype. Partials over more than two sets merge
the same way with m = max over all of them (`merge_attn_partials`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _merge_stacked(
    outs: torch.Tensor,  # [num_partials, num_tokens, num_heads, head_dim]
    lses: torch.Tensor,  # [num_partials, num_tokens, num_heads]
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    lses = lses.float()
    m = lses.amax(dim=0)  # [num_tokens, num_heads]
    # Rows where every partial is -inf: shift by 0 instead (all weights become 0).
    m_safe = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    w = torch.exp(lses - m_safe.unsqueeze(0))  # [num_partials, num_tokens, num_heads]
    denom = w.sum(dim=0)  # [num_tokens, num_heads]
    # A zero weight must zero its partial even if that partial's output is not finite.
    weighted = torch.where(
        (w > 0).unsqueeze(-1), w.unsqueeze(-1) * outs.float(), torch.zeros((), device=outs.device)
    )
    num = weighted.sum(dim=0)  # [num_tokens, num_heads, head_dim]
    safe_denom = torch.where(denom > 0, denom, torch.ones_like(denom))
    out = num / safe_denom.unsqueeze(-1)  # [num_tokens, num_heads, head_dim]
    lse = m_safe + torch.log(denom)  # log(0) = -inf for rows with no key at all
    return out.to(out_dtype), lse


def merge_attn_states(
    out_a: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    lse_a: torch.Tensor,  # [num_tokens, num_heads] float32
    out_b: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    lse_b: torch.Tensor,  # [num_tokens, num_heads] float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial attention results over disjoint key sets.

    Returns (out [num_tokens, num_heads, head_dim] in out_a's dtype,
    lse [num_tokens, num_heads] float32).
    """
    if out_a.shape != out_b.shape or lse_a.shape != lse_b.shape:
        raise ValueError(
            f"shape mismatch: out {tuple(out_a.shape)} vs {tuple(out_b.shape)}, "
            f"lse {tuple(lse_a.shape)} vs {tuple(lse_b.shape)}"
        )
    return _merge_stacked(torch.stack([out_a, out_b]), torch.stack([lse_a, lse_b]), out_a.dtype)


def merge_attn_partials(
    outs: Sequence[torch.Tensor],  # each [num_tokens, num_heads, head_dim]
    lses: Sequence[torch.Tensor],  # each [num_tokens, num_heads] float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge any number (>= 1) of partial attention results over disjoint key sets."""
    if len(outs) != len(lses) or not outs:
        raise ValueError(f"need matching, non-empty partials, got {len(outs)} outs and {len(lses)} lses")
    if len(outs) == 1:
        return outs[0], lses[0].float()
    return _merge_stacked(torch.stack(list(outs)), torch.stack(list(lses)), outs[0].dtype)


def merge_attn_stacked(
    outs: torch.Tensor,  # [num_partials, num_tokens, num_heads, head_dim]
    lses: torch.Tensor,  # [num_partials, num_tokens, num_heads]
) -> tuple[torch.Tensor, torch.Tensor]:
    """`merge_attn_partials` for partials already stacked along dim 0 (e.g. an all-gather)."""
    return _merge_stacked(outs, lses, outs.dtype)
