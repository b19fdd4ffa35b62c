"""Compile the page-aligned chunk kernel for sm_90 without a GPU and report its resources.

    python -m benchmarks.probes.chunk_tma_sm90_resources 64,64,128,64,4,4 128,128,64,64,4,3

Each argument: head_dim,block_m,block_n,page,num_warps,num_stages[,use_tma=1[,window=0]]
(G = 4 query heads per KV head, bf16). Triton 3.6 compiles `_chunk_tma_kernel` for
GPUTarget("cuda", 90) with the ptxas of its wheel; cuobjdump reads the cubin's registers
and stack (spills) per thread. Also whether the PTX holds wgmma and TMA loads, and the
shared memory. Only compile facts (no timing): register pressure of a variant before the
GPU sweep (`benchmarks/chunk_kernel_variants.py`) measures it. Ints that the real launch
specializes (multiples of 16) are plain i32 here, so the figures can differ slightly from
a launch's.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mnemosyne.kernels import chunk_tma_attention as tma

POINTERS = {
    "q_ptr": "*bf16", "o_ptr": "*bf16", "l_ptr": "*fp32", "qsl_ptr": "*i32", "q_pos_ptr": "*i64",
    "kv_start_ptr": "*i64", "kv_lens_ptr": "*i32", "bt_ptr": "*i32", "tile_seq_ptr": "*i32", "tile_off_ptr": "*i32",
}  # fmt: skip
UNIT_STRIDES = ("stride_qd", "stride_kd", "stride_vd", "stride_od")


def compile_variant(
    head_dim: int, block_m: int, block_n: int, page: int, num_warps: int, num_stages: int,
    use_tma: bool = True, window: bool = False, g: int = 4,
) -> dict:  # fmt: skip
    box, _ = tma.step_boxes(block_n, page)
    consts = dict(HEAD_DIM=head_dim, BLOCK_D=head_dim, G=g, BLOCK_Q=block_m // g, BLOCK_M=block_m, BLOCK_N=block_n,
                  BOX=box, PAGE=page, USE_WINDOW=window, USE_TMA=use_tma, IEEE=False, INTERPRET=False)  # fmt: skip
    consts.update(dict.fromkeys(UNIT_STRIDES, 1))
    fn = tma._chunk_tma_kernel
    signature = {}
    for name in fn.arg_names:
        if name in consts:
            signature[name] = "constexpr"
        elif name in POINTERS:
            signature[name] = POINTERS[name]
        elif name in ("k_src", "v_src"):
            signature[name] = f"tensordesc<bf16[{box}, {head_dim}]>" if use_tma else "*bf16"
        else:
            signature[name] = "fp32" if name == "qk_scale" else "i32"
    src = ASTSource(fn, signature, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    kernel = triton.compile(
        src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages)
    )
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run(
            [os.path.join(bindir, "cuobjdump"), "-res-usage", f.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    regs, stack = re.search(r"REG:(\d+)", usage), re.search(r"STACK:(\d+)", usage)
    ptx = kernel.asm["ptx"]
    return {
        "regs": regs and int(regs.group(1)), "stack_bytes": stack and int(stack.group(1)),
        "shared_bytes": kernel.metadata.shared, "wgmma": "wgmma" in ptx, "tma": "cp.async.bulk.tensor" in ptx,
    }  # fmt: skip


def main() -> None:
    for spec in sys.argv[1:]:
        values = [int(x) for x in spec.split(",")]
        print(spec, compile_variant(*values[:6], *map(bool, values[6:8])), flush=True)


if __name__ == "__main__":
    main()
