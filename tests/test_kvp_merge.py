"""The KVP merge's shared buffer (`layers/attention/kvp_merge.py`), without processes.

Each group's call is run twice: once to capture the buffer it would send (the all-gather
is replaced by a recorder), then with the recorded buffers of every group stacked as
the all-gather's result. Shared rows must equal the direct merge of the groups'
partials; unshared and padding rows keep their own partial; the buffer's row count
depends only on N_s (so graph, eager and idle groups agree).
"""

from __future__ import annotations

import pytest
import torch

from mnemosyne.layers.attention import kvp_merge
from mnemosyne.layers.attention.kvp_merge import (
    MAX_GRAPH_SHARED_TOKENS,
    KVPMergeIndex,
    merge_across_kvp_groups,
    merge_buffer_rows,
    padded_shared_tokens,
)
from mnemosyne.layers.attention.merge import merge_attn_partials
from mnemosyne.parallel.groups import GroupHandle


class _Recorded(Exception):
    pass


def test_padded_sizes():
    assert [padded_shared_tokens(n) for n in range(0, 7)] == [0, 1, 2, 4, 4, 5, 6]
    assert MAX_GRAPH_SHARED_TOKENS == 4
    assert [merge_buffer_rows(n) for n in (0, 1, 2, 3, 4, 5)] == [0, 2, 3, 5, 5, 6]


@pytest.mark.parametrize("num_shared", [1, 3, 6])
def test_shared_rows_merge_and_others_keep_their_partial(monkeypatch, num_shared):
    g = torch.Generator().manual_seed(num_shared)
    heads, dim = 3, 8
    rows = merge_buffer_rows(num_shared)
    trash = rows - 1
    # group A: [unshared, shared 0..n-1, padding row]; group B: [shared n-1..0] (another order)
    slots_a = torch.tensor([trash, *range(num_shared), trash])
    slots_b = torch.tensor(list(reversed(range(num_shared))))
    parts = {}
    for name, slots in (("a", slots_a), ("b", slots_b)):
        n = len(slots)
        out = torch.randn(n, heads, dim, generator=g)
        lse = torch.randn(n, heads, generator=g)
        if name == "a":
            lse[-1] = float("-inf")  # a padding row saw no key
            out[-1] = 0
        parts[name] = (out, lse, KVPMergeIndex(num_shared, slots))
    handle = GroupHandle(process_group=None, ranks=(0, 1), rank_in_group=0)  # size 2, no real group

    sent = []

    def record(packed, h):
        sent.append(packed.clone())
        raise _Recorded

    monkeypatch.setattr(kvp_merge, "all_gather_stacked", record)
    for out, lse, index in parts.values():
        with pytest.raises(_Recorded):
            merge_across_kvp_groups(out.clone(), lse, index, handle)
    assert all(p.shape[0] == rows for p in sent)
    gathered = torch.stack(sent)
    monkeypatch.setattr(kvp_merge, "all_gather_stacked", lambda packed, h: gathered)
    got = {
        name: merge_across_kvp_groups(out.clone(), lse, index, handle)
        for name, (out, lse, index) in parts.items()
    }

    out_a, lse_a, _ = parts["a"]
    out_b, lse_b, _ = parts["b"]
    order_b = list(reversed(range(num_shared)))
    want, _ = merge_attn_partials(
        [out_a[1 : 1 + num_shared], out_b[order_b]], [lse_a[1 : 1 + num_shared], lse_b[order_b]]
    )
    torch.testing.assert_close(got["a"][1 : 1 + num_shared], want)
    torch.testing.assert_close(got["b"][order_b], want)
    assert torch.equal(got["a"][0], out_a[0])  # unshared: its own partial
    assert torch.equal(got["a"][-1], out_a[-1])  # padding row
