"""kernels/jit_watch.py: a compile after warm-up is counted and logged with its signature."""

from __future__ import annotations

import logging
import types

import pytest

from mnemosyne.kernels.jit_watch import JitWatch, describe_variant


def test_compile_after_warm_up_is_counted_and_named(caplog: pytest.LogCaptureFixture) -> None:
    watch = JitWatch()
    fn = types.SimpleNamespace(name="_merge_kernel")
    compile = {
        "signature": {"o_ptr": "*bf16", "a_ptr": "*fp32", "num_heads": "i32", "BLOCK_H": "constexpr"},
        "constants": {(3,): 8},
        "configs": [{(0,): [["tt.divisibility", 16]]}],
    }
    kw = dict(
        key="k1", repr="_merge_kernel[num_warps=4](o_ptr: ()", fn=fn, compile=compile, is_manual_warmup=False
    )
    assert watch.before(**kw, already_compiled=False) is None
    with caplog.at_level(logging.WARNING, logger="mnemosyne.kernels.jit_watch"):
        watch.after(**kw, already_compiled=False)
    assert watch.num_compiles == 1 and watch.compile_s >= 0
    (record,) = caplog.records
    assert (
        "_merge_kernel(o_ptr: *bf16 [['tt.divisibility', 16]], a_ptr: *fp32, num_heads: i32, BLOCK_H=8)"
        in record.getMessage()
    )
    watch.after(**kw, already_compiled=True)  # a cache hit: no before() started it
    assert watch.num_compiles == 1


def test_describe_falls_back_to_tritons_repr() -> None:
    assert describe_variant(object(), {}, "kernel[num_warps=4](x: ?)") == "kernel[num_warps=4](x: ?)"
