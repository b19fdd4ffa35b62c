"""Fused Triton elementwise kernels (RMSNorm, add + RMSNorm, RoPE, SiLU * mul) against the
torch code they replace on CUDA (`RMSNorm._torch_norm`, `RotaryEmbedding` on CPU,
`F.silu(gate) * up`).

Without CUDA the kernels run in the Triton interpreter on CPU tensors (TRITON_INTERPRET
must be set before the kernel module is imported). The interpreter converts float32 to
bfloat16 by truncation, GPUs round to nearest even (Triton's default, `cvt.rn.bf16.f32`),
so the `rne_bf16` fixture gives the interpreter the GPU's rounding; with it the bfloat16
results of the interpreted kernels are exactly torch's.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from mnemosyne.config import RopeScaling  # noqa: E402
from mnemosyne.kernels.fused_ops import add_rms_norm, apply_rotary, rms_norm, silu_and_mul  # noqa: E402
from mnemosyne.layers.norm import RMSNorm  # noqa: E402
from mnemosyne.layers.rotary import RotaryEmbedding  # noqa: E402

device = "cuda" if torch.cuda.is_available() else "cpu"
# On a GPU the sum of squares is reduced in another order than torch's and rsqrt may be an
# approximation: rare one-ulp differences in bfloat16. The interpreter must match exactly.
EXACT_BF16 = device == "cpu"
EPS = 1e-5


@pytest.fixture(autouse=True)
def rne_bf16(monkeypatch):
    if device != "cpu":
        return
    from triton.runtime import interpreter

    original = interpreter._convert_float

    def convert(data, src, dst, rounding_mode):
        import triton.language as tl

        if src == tl.float32 and dst == tl.bfloat16:
            f32 = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
            return f32.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return original(data, src, dst, rounding_mode)

    monkeypatch.setattr(interpreter, "_convert_float", convert)


def randn(*shape: int, seed: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=gen)).to(dtype)


def assert_matches(out: torch.Tensor, ref: torch.Tensor) -> None:
    """fp32: ~1e-6; bf16: bit-exact (interpreter) or at most rare 1-ulp differences (GPU)."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    out, ref = out.cpu(), ref.cpu()
    if ref.dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    elif EXACT_BF16:
        assert torch.equal(out, ref), f"{(out != ref).sum().item()} of {out.numel()} values differ"
    else:
        torch.testing.assert_close(out, ref, atol=0, rtol=2**-7)
        assert (out != ref).sum().item() <= 1e-3 * out.numel()


def torch_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    norm = RMSNorm(x.shape[-1], EPS, weight.dtype)
    norm.weight.data.copy_(weight.cpu())
    return norm._torch_norm(x.cpu())


DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,hidden", [(1, 64), (7, 96), (33, 2048), (3, 20000), (0, 64)])
def test_rms_norm(dtype: torch.dtype, num_tokens: int, hidden: int) -> None:
    x = randn(num_tokens, hidden, seed=hidden + num_tokens, dtype=dtype, scale=3.0).to(device)
    weight = randn(hidden, seed=1, dtype=dtype).to(device)
    assert_matches(rms_norm(x, weight, EPS), torch_norm(x, weight))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,hidden", [(1, 64), (7, 96), (33, 2048), (3, 20000), (0, 64)])
def test_add_rms_norm(dtype: torch.dtype, num_tokens: int, hidden: int) -> None:
    x = randn(num_tokens, hidden, seed=hidden, dtype=dtype).to(device)
    residual = randn(num_tokens, hidden, seed=hidden + 1, dtype=dtype, scale=10.0).to(device)
    weight = randn(hidden, seed=2, dtype=dtype).to(device)
    x0, r0 = x.clone(), residual.clone()
    out, new_residual = add_rms_norm(x, residual, weight, EPS)
    ref_residual = x.cpu() + residual.cpu()
    assert torch.equal(new_residual.cpu(), ref_residual)  # one rounded add, exactly torch's
    assert_matches(out, torch_norm(ref_residual, weight))
    assert torch.equal(x, x0) and torch.equal(residual, r0)  # inputs untouched


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_strided_heads(dtype: torch.dtype) -> None:
    """q_norm of Qwen3: a [num_tokens, num_heads, head_dim] view of the qkv output."""
    num_tokens, num_heads, head_dim = 5, 4, 64
    qkv = randn(num_tokens, (num_heads + 4) * head_dim, seed=3, dtype=dtype).to(device)
    q = qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    weight = randn(head_dim, seed=4, dtype=dtype).to(device)
    assert_matches(rms_norm(q, weight, EPS), torch_norm(q, weight))


def test_rms_norm_layer_paths() -> None:
    """RMSNorm.forward on CPU is the torch code; the residual form returns (norm(x + r), x + r)."""
    norm = RMSNorm(96, EPS, torch.bfloat16)
    norm.weight.data.copy_(randn(96, seed=5, dtype=torch.bfloat16))
    x, r = randn(7, 96, seed=6, dtype=torch.bfloat16), randn(7, 96, seed=7, dtype=torch.bfloat16)
    out, new_r = norm(x, residual=r)
    assert torch.equal(new_r, x + r) and torch.equal(out, norm(x + r))
    if device == "cuda":
        norm = norm.to(device)
        out_c, new_r_c = norm(x.to(device), residual=r.to(device))
        assert torch.equal(new_r_c.cpu(), new_r)
        assert_matches(out_c, out)


def rope_reference(
    positions: torch.Tensor, q: torch.Tensor, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q * cos + rotate_half(q) * sin rounded once from fp32, |q1 cos| + |q2 sin| per value)."""
    half = q.shape[-1] // 2
    freqs = positions[:, None].float() * inv_freq[None, :]
    cos = freqs.cos().to(q.dtype).float()[:, None, :]
    sin = freqs.sin().to(q.dtype).float()[:, None, :]
    q1, q2 = q.float()[..., :half], q.float()[..., half:]
    once = torch.cat((q1 * cos - q2 * sin, q2 * cos + q1 * sin), dim=-1).to(q.dtype)
    scale = torch.cat(((q1 * cos).abs() + (q2 * sin).abs(), (q2 * cos).abs() + (q1 * sin).abs()), dim=-1)
    return once, scale


ROPE_CASES = [  # num_tokens, num_heads, num_kv_heads, head_dim, max position
    (1, 4, 2, 16, 10),
    (7, 8, 2, 64, 5_000),
    (33, 32, 8, 128, 3_000_000),
    (5, 3, 1, 96, 100),  # head_dim // 2 = 48, padded to 64
    (0, 4, 2, 64, 10),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ROPE_CASES)
def test_apply_rotary(dtype: torch.dtype, case: tuple[int, int, int, int, int]) -> None:
    num_tokens, num_heads, num_kv_heads, head_dim, max_pos = case
    scaling = RopeScaling(kind="llama3", factor=8.0) if head_dim == 128 else RopeScaling()
    rotary = RotaryEmbedding(head_dim, 500000.0, scaling)
    # q and k: strided views of one qkv projection output, as in LlamaAttention.
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = randn(num_tokens, q_size + 2 * kv_size, seed=head_dim, dtype=dtype, scale=2.0)
    gen = torch.Generator().manual_seed(head_dim + 1)
    positions = torch.randint(0, max_pos, (num_tokens,), generator=gen)
    q = qkv[:, :q_size].view(num_tokens, num_heads, head_dim)
    k = qkv[:, q_size : q_size + kv_size].view(num_tokens, num_kv_heads, head_dim)
    v_before = qkv[:, q_size + kv_size :].clone()
    ref_q, ref_k = rotary(positions, q, k)  # the CPU path: new tensors
    once_q, scale_q = rope_reference(positions, q, rotary.inv_freq)
    once_k, scale_k = rope_reference(positions, k, rotary.inv_freq)

    qkv_dev = qkv.to(device)
    q_dev = qkv_dev[:, :q_size].view(num_tokens, num_heads, head_dim)
    k_dev = qkv_dev[:, q_size : q_size + kv_size].view(num_tokens, num_kv_heads, head_dim)
    out_q, out_k = apply_rotary(q_dev, k_dev, positions.to(device), rotary.inv_freq.to(device))
    assert out_q.data_ptr() == q_dev.data_ptr() and out_k.data_ptr() == k_dev.data_ptr()  # in place
    assert torch.equal(qkv_dev[:, q_size + kv_size :].cpu(), v_before)  # v untouched
    for out, ref, once, scale in ((out_q, ref_q, once_q, scale_q), (out_k, ref_k, once_k, scale_k)):
        out = out.cpu()
        if dtype == torch.float32:
            torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
            continue
        # Within one bf16 ulp (at the products' magnitude) of torch's per-op rounding...
        assert ((out.float() - ref.float()).abs() <= 2**-7 * scale).all()
        # ...and (up to rare last-bit differences of cos/sin) exactly the single rounding.
        assert (out != once).sum().item() <= 1e-3 * out.numel()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,inter", [(1, 64), (7, 96), (33, 2048), (0, 64)])
def test_silu_and_mul(dtype: torch.dtype, num_tokens: int, inter: int) -> None:
    x = randn(num_tokens, 2 * inter, seed=inter, dtype=dtype, scale=3.0)
    gate, up = x.chunk(2, dim=-1)
    assert_matches(silu_and_mul(x.to(device)), F.silu(gate) * up)


def test_silu_and_mul_strided_rows() -> None:
    wide = randn(9, 3 * 80, seed=8, dtype=torch.bfloat16)
    x = wide[:, : 2 * 80]  # row stride 240, not 160
    gate, up = x.chunk(2, dim=-1)
    assert_matches(silu_and_mul(x.to(device)), F.silu(gate) * up)
