"""Compile Triton kernels for sm_90 (H100 / H200) on a machine without a GPU:
`python -m tests.compile_sm90` prints each kernel it compiled. Run with
TRITON_INTERPRET unset (the interpreter's kernels cannot be compiled); the tests call it in
a child process. Compilation type-checks what the interpreter does not."""

from __future__ import annotations

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

SM90 = GPUTarget("cuda", 90, 32)


def compile_sm90(
    kernel: triton.JITFunction, pointers: dict[str, str], constexprs: dict, num_warps: int
) -> None:
    """Every argument not in `pointers` or `constexprs` is an i32 (fp32 for `qk_scale`)."""
    names = kernel.arg_names
    signature = {n: pointers.get(n, "constexpr" if n in constexprs else "i32") for n in names}
    signature |= {n: "fp32" for n in ("qk_scale",) if n in names}
    src = ASTSource(kernel, signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    triton.compile(src, target=SM90, options={"num_warps": num_warps})
    print(kernel.fn.__name__, flush=True)


def compile_decode() -> None:
    from mnemosyne.kernels.decode_attention import _decode_reduce_kernel, _decode_split_kernel

    lengths = {"qsl_ptr": "*i32", "qpos_ptr": "*i64", "kv_start_ptr": "*i64", "kv_lens_ptr": "*i32",
               "seq_ids_ptr": "*i32"}  # fmt: skip
    split = lengths | {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "bt_ptr": "*i32", "o_ptr": "*fp32",
                       "l_ptr": "*fp32", "out_ptr": "*bf16", "lse_ptr": "*fp32"}  # fmt: skip
    for direct in (False, True):
        compile_sm90(_decode_split_kernel, split,
                     dict(GROUP=4, HEAD_DIM=128, BLOCK_SIZE=64, BLOCK_M=16, BLOCK_N=128, BLOCK_D=128,
                          SEQ_BLOCK=128, HAS_WINDOW=False, DIRECT=direct, PRECISION="tf32", INTERPRET=False),
                     num_warps=8)  # fmt: skip
    compile_sm90(_decode_reduce_kernel, lengths | {"wo_ptr": "*fp32", "wl_ptr": "*fp32", "o_ptr": "*bf16", "l_ptr": "*fp32"},
                 dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_S=64, CHUNK=16, BLOCK_N=128, SEQ_BLOCK=128, HAS_WINDOW=False),
                 num_warps=4)  # fmt: skip


if __name__ == "__main__":
    compile_decode()
