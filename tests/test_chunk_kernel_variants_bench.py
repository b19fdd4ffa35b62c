"""benchmarks/chunk_kernel_variants.py: its config grid and summary (the GPU run is the lead's)."""

from __future__ import annotations

from benchmarks.chunk_kernel_variants import DEFAULTS_CONFIG, config_key, summarize, variant_configs
from mnemosyne.kernels.chunk_tma_launch import step_boxes


def test_variant_configs_are_servable():
    for smoke in (False, True):
        configs = variant_configs(smoke=smoke)
        assert len({config_key(c) for c in configs}) == len(configs)
        assert DEFAULTS_CONFIG in configs
        for c in configs:
            if c is DEFAULTS_CONFIG:
                continue
            step_boxes(c["block_n"], c["page"])  # single- or multi-page steps this page takes
            assert c["block_m"] in (32, 64, 128) and not (c["block_m"] == 64 and c["num_warps"] == 8)
    multi_page = [c for c in variant_configs(smoke=False) if c["block_n"] and c["block_n"] > c["page"]]
    assert {(c["page"], c["block_n"]) for c in multi_page} == {(64, 128)}


def test_summarize_picks_the_fastest_per_point():
    rows = [
        {"kernel": "splitkv", "page": 16, "chunk": 32, "prefix": 8, "ms": 2.0, "floor_ms": 1.0},
        {"kernel": "tma", "page": 128, "block_n": 64, "chunk": 32, "prefix": 8, "ms": 1.5, "floor_ms": 1.0,
         "ratio_to_floor": 1.5, "tflops": 1.0, "num_splits": 4},
        {"kernel": "tma", "page": 128, "block_n": 128, "chunk": 32, "prefix": 8, "ms": 1.2, "floor_ms": 1.0,
         "ratio_to_floor": 1.2, "tflops": 1.2, "num_splits": 4, "waves": 8},
        {"kernel": "tma", "page": 64, "block_n": 64, "chunk": 32, "prefix": 8, "error": "OutOfResources"},
    ]  # fmt: skip
    (s,) = summarize(rows)
    assert s["splitkv_best_ms"] == 2.0 and s["tma_best_ms"] == 1.2
    assert s["tma_best_options"] == {"page": 128, "block_n": 128, "waves": 8}
    assert config_key(rows[1]) != config_key(rows[2])
