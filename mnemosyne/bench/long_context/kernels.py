"""Attention kernel throughput against the hardware floor (one GPU).

    decode:  paged split-KV decode over B sequences of L keys each
             effective TB/s = K/V bytes read / time;  floor = bytes / copy bandwidth (4.2 TB/s)
    prefill: one chunk of c queries after a prefix of P keys (causal on its own keys)
             TFLOP/s = 4 * H * D * (c * P + c (c + 1) / 2) / time;  floor = FLOPs / 590 TFLOP/s

Blocks are laid out as the engine leaves them for a long request (one ascending run) and,
as a check, shuffled (every block elsewhere: the cuDNN path gathers the prefix first).
"""

from __future__ import annotations

import torch

from mnemosyne.kernels.decode_attention import paged_decode_attention
from mnemosyne.kernels.decode_items import choose_split_budget
from mnemosyne.layers.attention.kernel_backend import KernelBackend
from mnemosyne.layers.attention.metadata import AttentionMetadata

COPY_TBPS = 4.2
ATTN_TFLOPS = 590.0
BLOCK = 16


def time_ms(fn, iters: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def _cache(num_tokens: int, hkv: int, d: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    nb = -(-num_tokens // BLOCK)
    k = torch.randn(nb, BLOCK, hkv, d, device="cuda", dtype=dtype)
    return k, torch.randn_like(k)


def _tables(num_seqs: int, blocks_per_seq: int, shuffled: bool) -> list[list[int]]:
    ids = torch.randperm(num_seqs * blocks_per_seq) if shuffled else torch.arange(num_seqs * blocks_per_seq)
    return [ids[i * blocks_per_seq : (i + 1) * blocks_per_seq].tolist() for i in range(num_seqs)]


def bench_decode(
    num_seqs: int, ctx: int, h: int = 32, hkv: int = 8, d: int = 128, shuffled: bool = False
) -> dict:
    dtype = torch.bfloat16
    k_cache, v_cache = _cache(num_seqs * ctx, hkv, d, dtype)
    nbps = -(-ctx // BLOCK)
    meta = AttentionMetadata.build(
        query_lens=[1] * num_seqs,
        q_pos_start=[ctx - 1] * num_seqs,
        kv_start=[0] * num_seqs,
        kv_lens=[ctx] * num_seqs,
        block_tables=_tables(num_seqs, nbps, shuffled),
        slot_mapping=[-1] * num_seqs,
        device="cuda",
    )
    q = torch.randn(num_seqs, h, d, device="cuda", dtype=dtype)
    out = torch.empty_like(q)
    lse = torch.empty(num_seqs, h, device="cuda", dtype=torch.float32)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    splits = choose_split_budget(hkv, sms, head_dim=d)
    seq_ids = torch.arange(num_seqs, device="cuda", dtype=torch.int32)
    args = (meta.query_start_loc, meta.q_pos_start, meta.kv_start, meta.kv_lens, meta.block_tables, seq_ids)
    ms = time_ms(lambda: paged_decode_attention(q, k_cache, v_cache, *args, out, lse, d**-0.5, None, splits))
    nbytes = 2 * num_seqs * ctx * hkv * d * dtype.itemsize
    floor_ms = nbytes / (COPY_TBPS * 1e12) * 1e3
    return {
        "kind": "decode", "num_seqs": num_seqs, "ctx": ctx, "heads": h, "kv_heads": hkv, "head_dim": d,
        "shuffled_blocks": shuffled, "split_budget": splits, "ms": ms, "floor_ms": floor_ms,
        "tbps": nbytes / (ms * 1e-3) / 1e12, "ratio_to_floor": ms / floor_ms,
    }  # fmt: skip


def bench_prefill_chunk(
    chunk: int,
    prefix: int,
    h: int = 32,
    hkv: int = 8,
    d: int = 128,
    shuffled: bool = False,
    path: str = "backend",
) -> dict:
    """path: "backend" (KernelBackend: cuDNN for a chunk this long) or "triton" (paged Triton kernel)."""
    dtype = torch.bfloat16
    total = prefix + chunk
    k_cache, v_cache = _cache(total, hkv, d, dtype)
    meta = AttentionMetadata.build(
        query_lens=[chunk],
        q_pos_start=[prefix],
        kv_start=[0],
        kv_lens=[total],
        block_tables=_tables(1, -(-total // BLOCK), shuffled),
        slot_mapping=[-1] * chunk,
        device="cuda",
    )
    q = torch.randn(chunk, h, d, device="cuda", dtype=dtype)
    backend = KernelBackend(h // hkv, d, dtype, torch.device("cuda"), use_cudnn=path == "backend")
    meta.backend_plan = backend.plan(meta, hkv, None)
    if path == "triton":
        assert not meta.backend_plan.dense and meta.backend_plan.tile_seq is not None
    ms = time_ms(lambda: backend.forward(q, k_cache, v_cache, meta, d**-0.5), iters=5)
    flops = 4 * h * d * (chunk * prefix + chunk * (chunk + 1) / 2)
    floor_ms = flops / (ATTN_TFLOPS * 1e12) * 1e3
    return {
        "kind": "prefill_chunk", "path": path, "chunk": chunk, "prefix": prefix, "heads": h, "kv_heads": hkv,
        "head_dim": d, "shuffled_blocks": shuffled, "ms": ms, "floor_ms": floor_ms,
        "tflops": flops / (ms * 1e-3) / 1e12, "ratio_to_floor": ms / floor_ms,
    }  # fmt: skip


def run_all() -> list[dict]:
    results = []
    cases = [
        lambda: bench_decode(1, 1 << 20),
        lambda: bench_decode(1, 1 << 20, shuffled=True),
        lambda: bench_decode(1, 1 << 17),
        lambda: bench_decode(8, 1 << 17),
        lambda: bench_decode(64, 1 << 14),
        lambda: bench_decode(1, 1 << 20, h=32, hkv=8, d=64),
        lambda: bench_prefill_chunk(4096, 1 << 17),
        lambda: bench_prefill_chunk(4096, 1 << 17, shuffled=True),
        lambda: bench_prefill_chunk(4096, 1 << 17, path="triton"),
        lambda: bench_prefill_chunk(8192, 1 << 19),
        lambda: bench_prefill_chunk(2048, 1 << 15, d=64),
    ]
    for case in cases:
        torch.cuda.empty_cache()
        try:
            r = case()
        except Exception as e:  # noqa: BLE001 (report and go on with the other cases)
            r = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(r, flush=True)
        results.append(r)
    return results


if __name__ == "__main__":
    run_all()
