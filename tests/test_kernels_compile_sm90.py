"""Every Triton kernel launch that a CPU workload makes (the engine on the kernel backend:
decode, chunk and split-KV attention, the merges, fused norms / RoPE / SiLU, the KV write;
float32 and bfloat16, with and without a sliding window) compiles for sm_90. See
`compile_sm90.py`: the interpreter that runs them here does not type-check them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from compile_sm90 import record_launches
from conftest import TEST_DEVICE

from mnemosyne import LLM, SamplingParams

# Kernels the workload must reach (a kernel renamed or no longer launched fails here).
EXPECTED = {
    "_decode_split_kernel", "_decode_reduce_kernel", "_chunk_tma_kernel", "_chunk_split_kernel",
    "_split_rows_merge_kernel", "_rms_norm_kernel", "_rotary_kernel", "_silu_and_mul_kernel", "_write_kv_kernel",
}  # fmt: skip


def run_fused_ops(dtype: torch.dtype) -> None:
    """The fused RMSNorm / RoPE / SiLU kernels (the model calls them only on CUDA), at the 8B
    shape's head dim, GQA 4, on q and k as strided views of one projection as the model has them."""
    from mnemosyne.kernels.fused_ops import add_rms_norm, apply_rotary, rms_norm, silu_and_mul

    x, residual, weight = (
        torch.randn(5, 256, dtype=dtype),
        torch.randn(5, 256, dtype=dtype),
        torch.ones(256, dtype=dtype),
    )
    rms_norm(x, weight, 1e-5)
    add_rms_norm(x, residual, weight, 1e-5)
    qkv = torch.randn(5, 4 * 128 + 2 * 128, dtype=dtype)
    q, k = qkv[:, :512].view(5, 4, 128), qkv[:, 512:640].view(5, 1, 128)
    apply_rotary(q, k, torch.arange(5), 1.0 / (500000.0 ** (torch.arange(0, 128, 2).float() / 128)))
    silu_and_mul(torch.randn(5, 2 * 96, dtype=dtype))


def run_workload(model_dir: Path, dtype: str, block_size: int) -> None:
    """Prompts of 150 and 9 tokens in 16-token chunks, then 3 decodes each: chunks after a
    prefix long enough to split, beside decodes, through the kernel backend."""
    llm = LLM(model=str(model_dir), dtype=dtype, device="cpu", chunk_size=16, max_num_batched_tokens=19,
              block_size=block_size, attention_backend="kernels")  # fmt: skip
    vocab = llm.engine.config.model.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (150, 9)]
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    llm.shutdown()


@pytest.mark.skipif(TEST_DEVICE != "cpu", reason="on a GPU the tests compile every kernel themselves")
def test_every_kernel_launch_compiles_for_sm90(tiny_model_dir, tmp_path):
    with record_launches() as specs:
        for name, dtype, block_size in (
            ("llama", "float32", 32),
            ("llama", "bfloat16", 64),
            ("mistral_sliding", "float32", 16),
        ):
            run_workload(tiny_model_dir(name), dtype, block_size)
        for dtype in (torch.float32, torch.bfloat16):
            run_fused_ops(dtype)
    names = {s.name for s in specs.values()}
    assert EXPECTED <= names, f"the workload no longer launches {sorted(EXPECTED - names)}"
    path = tmp_path / "specs.json"
    path.write_text(json.dumps([vars(s) for s in specs.values()]))
    root = Path(__file__).parent.parent  # the child compiles this checkout's kernels, whatever is installed
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [env.get("PYTHONPATH")])])
    run = subprocess.run([sys.executable, str(Path(__file__).parent / "compile_sm90.py"), str(path)], env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    assert len(run.stdout.split()) == len(specs)
