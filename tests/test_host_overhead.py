"""Host fast paths give what the general paths give, and the host-overhead benchmark runs."""

from __future__ import annotations

import pytest
import torch

from mnemosyne.layers.attention.metadata import AttentionMetadata, to_device_packed
from mnemosyne.layers.sampler import Sampler
from mnemosyne.sampling_params import SamplingParams


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_greedy_fast_path_equals_general_path(dtype: torch.dtype) -> None:
    logits = torch.randn(7, 50, generator=torch.Generator().manual_seed(0)).to(dtype)
    logits[3, 4] = logits[3, 40] = logits[3].max() + 1  # a tie: the lowest id wins on both paths
    fast = Sampler()(logits, [SamplingParams(temperature=0)] * 7, [None] * 7)
    # logprobs=0 makes every row take the general path (same tokens, plus their logprobs)
    general = Sampler()(logits, [SamplingParams(temperature=0, logprobs=0)] * 7, [None] * 7)
    assert fast.token_ids == general.token_ids
    assert fast.token_ids[3] == 4
    assert fast.logprobs == [None] * 7
    # one non-greedy row sends the batch down the general path: the greedy rows are unchanged
    mixed = [SamplingParams(temperature=0)] * 6 + [SamplingParams(temperature=1.0, seed=3)]
    gens = [None] * 6 + [torch.Generator().manual_seed(3)]
    assert Sampler()(logits, mixed, gens).token_ids[:6] == fast.token_ids[:6]


def test_to_device_packed_round_trip() -> None:
    lists = ([3, 1, 4], [], [1, 5], [-1])
    views = to_device_packed(lists, torch.int64, torch.device("cpu"))
    assert [v.tolist() for v in views] == [list(x) for x in lists]
    assert all(v.dtype == torch.int64 and v.is_contiguous() for v in views)
    assert to_device_packed(((), ()), torch.int32, torch.device("cpu"))[1].shape == (0,)


def test_metadata_tables_from_lists_and_tensors_agree() -> None:
    tables = [[7, 8, 9], [], [2]]
    kw = dict(
        query_lens=[1, 2, 1],
        q_pos_start=[40, 0, 5],
        kv_start=[0, 0, 0],
        kv_lens=[41, 2, 6],
        slot_mapping=[121, 0, 1, 37],
        device="cpu",
    )
    from_lists = AttentionMetadata.build(block_tables=tables, **kw)
    from_tensors = AttentionMetadata.build(
        block_tables=[torch.tensor(t, dtype=torch.int32) for t in tables], **kw
    )
    expected = torch.tensor([[7, 8, 9], [0, 0, 0], [2, 0, 0]], dtype=torch.int32)
    for meta in (from_lists, from_tensors):
        assert torch.equal(meta.block_tables, expected)
        assert meta.query_start_loc.tolist() == [0, 1, 3, 4] and meta.query_start_loc.dtype == torch.int32
        assert meta.kv_lens.dtype == torch.int32 and meta.slot_mapping.dtype == torch.int64
        assert meta.slot_mapping.tolist() == [121, 0, 1, 37] and meta.q_pos_start.tolist() == [40, 0, 5]
        assert meta.block_runs_cpu == [(7, 3), (0, 0), (2, 1)]
    empty = AttentionMetadata.build([], [], [], [], [], [], "cpu")
    assert empty.block_tables.shape == (0, 1) and empty.query_start_loc.tolist() == [0]


def test_host_overhead_benchmark_smoke() -> None:
    from benchmarks.host_overhead import main

    res = main(["--batch-sizes", "1,3", "--contexts", "300", "--steps", "3", "--warmup", "1"])
    assert [b["num_decodes"] for b in res["batches"]] == [1, 3]
    assert res["contexts"][0]["kv_synthetic"]
    for case in res["batches"] + res["contexts"]:
        phases = case["phases"]
        assert phases["host"]["mean_us"] <= phases["step"]["mean_us"]
        assert case["host_calls_per_step"] > 0


def test_pad_on_device_with_sent_lengths() -> None:
    from mnemosyne.layers.attention.metadata import _pad_on_device

    tables = [torch.tensor(t, dtype=torch.int32) for t in ([5, 6, 7], [], [9])]
    want = torch.nn.utils.rnn.pad_sequence(tables, batch_first=True)
    cpu = torch.device("cpu")
    lens_d = torch.tensor([3, 0, 1])
    assert torch.equal(_pad_on_device(tables, 3, cpu), want)
    assert torch.equal(_pad_on_device(tables, 3, cpu, lens_d), want)


def test_metadata_int64_cpu_tables_give_int32() -> None:
    meta = AttentionMetadata.build([1], [3], [0], [4], [torch.tensor([6], dtype=torch.int64)], [27], "cpu")
    assert meta.block_tables.dtype == torch.int32 and meta.block_tables.tolist() == [[6]]
