"""The warp-specialized Gluon chunk kernel compiles for sm_90 on a machine without a GPU
(ptxas ships with Triton): Gluon has no interpreter, so this is what CI can check of it;
tests/test_kernel_chunk_ws.py runs it on an H200. The variants warm-up builds: head dims 64
and 128, both tile heights, with and without a window, output to the split workspace (fp32)
or straight to `out` (bf16). In a child process without TRITON_INTERPRET (the test session
may run the Triton kernels in the interpreter, which Gluon code cannot call into)."""

from __future__ import annotations

import os
import subprocess
import sys

VARIANTS = [(128, 32, False, "fp32"), (128, 16, True, "bf16"), (64, 32, True, "fp32")]


def compile_variants() -> None:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import compile as triton_compile
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    from mnemosyne.kernels.chunk_ws_attention import WS_MAXNREG, WS_PAGE, _chunk_ws_kernel

    pointers = {"q_ptr": "*bf16", "l_ptr": "*fp32", "qsl_ptr": "*i32", "q_pos_ptr": "*i64", "kv_start_ptr": "*i64",
                "kv_lens_ptr": "*i32", "bt_ptr": "*i32", "tile_seq_ptr": "*i32", "tile_off_ptr": "*i32"}  # fmt: skip
    for head_dim, block_q, window, out in VARIANTS:
        layout = gl.NVMMASharedLayout.get_default_for([WS_PAGE, head_dim], gl.bfloat16)
        signature = {}
        for name in _chunk_ws_kernel.arg_names:
            if name in ("k_desc", "v_desc"):
                signature[name] = f"tensordesc<bf16[{WS_PAGE}, {head_dim}],{layout!r}>"
            elif name == "o_ptr":
                signature[name] = f"*{out}"
            elif name in pointers:
                signature[name] = pointers[name]
            elif name == "qk_scale":
                signature[name] = "fp32"
            elif name.isupper():
                signature[name] = "constexpr"
            else:
                signature[name] = "i32"
        constexprs = {"HEAD_DIM": head_dim, "G": 4, "BLOCK_Q": block_q, "USE_WINDOW": window, "STRIDED": False}
        kernel = triton_compile(
            GluonASTSource(_chunk_ws_kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32),
            options={"num_warps": 4, "maxnreg": WS_MAXNREG},
        )  # fmt: skip
        ptx = kernel.asm["ptx"]
        assert "wgmma.mma_async" in ptx and "cp.async.bulk.tensor" in ptx and "setmaxnreg" in ptx, (head_dim, block_q)
        print("compiled", head_dim, block_q, window, out, flush=True)


def test_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("compiled") == len(VARIANTS)


if __name__ == "__main__":
    compile_variants()
