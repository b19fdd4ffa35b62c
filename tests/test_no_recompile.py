"""No Triton compile while serving: every kernel variant a step launches was compiled by warm-up.

Triton compiles one variant per *specialization key* of a launch: the constexpr values, the
launch options, each tensor's dtype and 16-byte alignment, and each int argument's class
(== 1, a multiple of 16, other, >= 2**31) unless the kernel lists it in `do_not_specialize`.
An int that changes from step to step (a split count, a decode count, a block table's width)
therefore compiles new variants mid-serving: 5-6 s stalls of every request, measured on an
H200 (benchmarks/results/serving_trace/).

Here every launch of the attention kernels is recorded instead of run, its key computed with
Triton's own rule (`native_specialize_impl`), first for `KernelBackend.warm_up` and then for
steps of every kind (decode batches of 1 to 64, chunks of 1 to 300 tokens after 0 to 20K
keys, split counts from 1 to 64, mixed batches, KVP pieces); every key of the steps must be
one warm-up produced.
"""

from __future__ import annotations

import inspect
import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from triton.backends.compiler import BaseBackend  # noqa: E402
from triton.runtime.jit import native_specialize_impl  # noqa: E402

from mnemosyne.kernels import chunk_splitkv_attention, chunk_tma_attention, decode_attention, merge_attn  # noqa: E402
from mnemosyne.layers.attention.kernel_backend import KernelBackend  # noqa: E402
from mnemosyne.layers.attention.metadata import AttentionMetadata  # noqa: E402

KERNELS = {
    "chunk": (chunk_splitkv_attention, "_chunk_split_kernel"),
    "chunk_merge": (merge_attn, "_split_rows_merge_kernel"),
    "chunk_page_tiles": (chunk_tma_attention, "_chunk_tma_kernel"),
    "decode": (decode_attention, "_decode_split_kernel"),
    "decode_reduce": (decode_attention, "_decode_reduce_kernel"),
    "merge": (merge_attn, "_merge_kernel"),
}
H, HKV, D = 32, 8, 128  # Llama-3-8B heads


def _do_not_specialize(kernel, what: str = "do_not_specialize") -> set[str]:
    names = getattr(kernel, what, None)  # JITFunction
    if names is None:  # the interpreter's InterpretedFunction keeps the decorator's kwargs
        names = kernel.kwargs.get(what) or []
    return set(names)


def launch_key(kernel, args: tuple, kwargs: dict) -> tuple:
    """What Triton compiles a variant for (see the module docstring)."""
    params = inspect.signature(kernel.fn).parameters
    bound = inspect.signature(kernel.fn).bind_partial(
        *args, **{k: v for k, v in kwargs.items() if k in params}
    )
    dns = _do_not_specialize(kernel)
    dns_alignment = _do_not_specialize(kernel, "do_not_specialize_on_alignment")
    key: list = [tuple(sorted((k, v) for k, v in kwargs.items() if k not in params))]  # num_warps, ...
    for name, value in bound.arguments.items():
        if "constexpr" in str(params[name].annotation):
            key.append((name, value))
        elif isinstance(value, torch.Tensor):
            aligned = None if name in dns_alignment else value.data_ptr() % 16 == 0
            key.append((name, str(value.dtype), aligned))
        elif isinstance(value, bool | float):
            key.append((name, type(value).__name__))
        elif isinstance(value, int):
            key.append((name, native_specialize_impl(BaseBackend, value, False, name not in dns, True)))
        else:
            key.append((name, type(value).__name__))
    return tuple(key)


class Recorder:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.keys: dict[str, set[tuple]] = {name: set() for name in KERNELS}
        for name, (module, attr) in KERNELS.items():
            kernel = getattr(module, attr)
            # In the instance's __dict__, removed again afterwards: a setattr would leave the
            # class's bound method there, hiding later patches of the class's `run`
            # (tests/compile_sm90.py records launches that way)
            monkeypatch.setitem(vars(kernel), "run", self._recorder(name, kernel))

    def _recorder(self, name: str, kernel):
        def run(*args, grid, warmup, **kwargs) -> None:
            self.keys[name].add(launch_key(kernel, args, kwargs))

        return run

    def take(self) -> dict[str, set[tuple]]:
        keys, self.keys = self.keys, {name: set() for name in KERNELS}
        return keys


def _step(backend: KernelBackend, caches, seqs: list[tuple[int, int, int, int]], rng: random.Random) -> None:
    """seqs: (query_len, q_pos_start, kv_start, kv_len); blocks drawn at random."""
    k_cache, v_cache = caches
    num_blocks, block_size = k_cache.shape[:2]
    tables = [rng.sample(range(num_blocks), -(-kv_len // block_size)) for *_, kv_len in seqs]
    num_tokens = sum(s[0] for s in seqs)
    meta = AttentionMetadata.build(
        [s[0] for s in seqs], [s[1] for s in seqs], [s[2] for s in seqs], [s[3] for s in seqs],
        tables, [-1] * num_tokens, backend.device,
    )  # fmt: skip
    query = torch.zeros(num_tokens, H, D, dtype=backend.dtype, device=backend.device)
    backend.forward(query, k_cache, v_cache, meta, D**-0.5, None)


@pytest.mark.parametrize("block_size", [16, 64])  # per-key gathers; page-aligned tiles
def test_serving_steps_launch_only_warmed_variants(monkeypatch: pytest.MonkeyPatch, block_size: int) -> None:
    device = torch.device("cpu")
    backend = KernelBackend(H // HKV, D, torch.bfloat16, device)
    backend.num_sms = 132  # an H200's split counts (up to 64 here), whatever this machine has
    max_num_decodes = 64
    num_blocks = 21_000 // block_size
    caches = tuple(torch.zeros(num_blocks, block_size, HKV, D, dtype=torch.bfloat16) for _ in range(2))
    recorder = Recorder(monkeypatch)
    backend.warm_up(*caches, None, max_num_decodes)
    warmed = recorder.take()
    chunk_kernel = "chunk_page_tiles" if block_size % 64 == 0 else "chunk"
    assert warmed[chunk_kernel] and warmed["decode"] and warmed["chunk_merge"], warmed

    rng = random.Random(0)
    steps: list[list[tuple[int, int, int, int]]] = []
    for n in (1, 2, 3, 5, 16, 17, 33, 64):  # decode batches
        lens = [rng.randint(1, 20_000) for _ in range(n)]
        steps.append([(1, kv - 1, 0, kv) for kv in lens])
    for c in (1, 7, 16, 32, 33, 100, 300):  # one chunk after a prefix
        for prefix in (0, 17, 1000, 4096, 20_000):
            steps.append([(c, prefix, 0, prefix + c)])
    for n, c, prefix in ((1, 128, 16_000), (16, 32, 5000), (31, 48, 12_345)):  # mixed
        lens = [rng.randint(1, 4000) for _ in range(n)]
        steps.append([(1, kv - 1, 0, kv) for kv in lens] + [(c, prefix, 0, prefix + c)])
    steps.append([(64, 9000, 4096, 9000 + 64 - 4096)])  # a KVP group's piece, own keys too
    steps.append([(64, 9000, 0, 4096)])  # an older piece: keys before every query
    for seqs in steps:
        _step(backend, caches, seqs, rng)
    served = recorder.take()
    for name, keys in served.items():
        missed = keys - warmed[name]
        assert not missed, (
            f"{name}: {len(missed)} variant(s) warm-up did not compile, e.g. {sorted(missed)[0]}"
        )


def test_merges_of_any_chunk_are_one_variant(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cuDNN path's merges take its outputs for c queries ([H, c] LSE: strides follow c)
    and slices at each chunk's first row: one variant for every c and row."""
    recorder = Recorder(monkeypatch)
    num_heads, head_dim = 14, 64  # 14 heads: a row's LSE is 56 bytes, so slices are not 16-byte aligned
    for c in (1, 2, 7, 16, 33, 128):
        for row0 in (0, 1, 3):
            n = row0 + c
            out = torch.zeros(n, num_heads, head_dim)[row0:]
            lse = torch.zeros(n, num_heads)[row0:]
            out_b = torch.zeros(1, num_heads, c, head_dim)[0].transpose(0, 1)  # cuDNN's BHSD output
            lse_b = torch.zeros(1, num_heads, c)[0].t()  # [c, H] view of [H, c]
            merge_attn.merge_attn_states_into(out, lse, out, lse, out_b, lse_b)
    keys = recorder.take()["merge"]
    assert len(keys) == 1, f"{len(keys)} variants"


def test_cudnn_path_merges_are_warmed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cuDNN path merges float32 or model-dtype accumulators with its model-dtype
    partials into float32 or model-dtype outputs (`dense_chunk_attention`): warm-up compiles
    every such variant (a compile of one mid-serving was logged on an H200 serving trace)."""
    from mnemosyne.kernels import cudnn_prefill

    calls: list[tuple] = []
    monkeypatch.setattr(
        "mnemosyne.layers.attention.kernel_backend.warm_up_merges", lambda *a: calls.append(a)
    )
    backend = KernelBackend(H // HKV, D, torch.bfloat16, torch.device("cpu"), use_cudnn=True)
    caches = tuple(torch.zeros(8, 64, HKV, D, dtype=torch.bfloat16) for _ in range(2))
    monkeypatch.setattr(backend, "forward", lambda *a, **k: None)  # only the merges here
    backend.warm_up(*caches, None, 1)
    assert calls == [(H, D, torch.bfloat16, torch.device("cpu"))]

    recorder = Recorder(monkeypatch)
    cudnn_prefill.warm_up_merges(H, D, torch.bfloat16, torch.device("cpu"))
    warmed = recorder.take()["merge"]
    c = 37
    for out_dtype in (torch.bfloat16, torch.float32):
        for acc_dtype in (torch.bfloat16, torch.float32):
            out = torch.zeros(3 + c, H, D, dtype=out_dtype)[3:]
            lse = torch.zeros(3 + c, H)[3:]
            acc = torch.zeros(c, H, D, dtype=acc_dtype)
            acc_lse = torch.zeros(c, H)
            out_b = torch.zeros(1, H, c, D, dtype=torch.bfloat16)[0].transpose(0, 1)  # cuDNN's BHSD
            lse_b = torch.zeros(1, H, c)[0].t()
            merge_attn.merge_attn_states_into(out, lse, acc, acc_lse, out_b, lse_b)
    served = recorder.take()["merge"]
    assert len(warmed) == 4 and served <= warmed
