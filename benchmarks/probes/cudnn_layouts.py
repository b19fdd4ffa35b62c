"""cuDNN's attention of one long-prompt chunk per memory layout: the engine's call against
the probes' calls, one layer, 8B heads (32 query / 8 KV heads, head dim 128), bf16.

The question: the twenty-second session's `two_lane_overlap` probe ran a 4096-token chunk
after 229K keys on every SM in ~834 ms (the whole model), where the engine's cuDNN path
took ~990 ms after 224K keys (`lane_chunk_profile`, "Twenty-sixth session"), with cuDNN's
attention 90% of it at ~567 TFLOP/s. The probe's chunk reads K / V as contiguous BHSD
tensors, [1, Hkv, n, D], so cuDNN builds a graph for each length; the engine reads the
paged cache's BSHD memory, [n, Hkv, D], through the ragged path that serves every length
with one graph (`TORCH_CUDNN_SDPA_AVOID_RECOMPILE`), and asks for the LSE. Variants:

    engine          `dense_chunk_attention`: 128K-key prefix segments, the own keys causal, merged
    engine_exact    the same with exact graphs (`DenseChunk.exact_keys`): prefix segments of
                    multiples of 16K keys, the rest ragged, the own keys exact
    exact           one call over the whole prefix, q in BHSD memory, K / V views of the cache
    bshd_lse        one call over the whole prefix, BSHD views of the cache, LSE (the engine's call)
    bshd            the same without the LSE (`F.scaled_dot_product_attention`)
    bhsd            contiguous BHSD K / V, no LSE (the probe's chunk call)
    bhsd_lse        contiguous BHSD K / V, LSE
    bhsd_copy_lse   the prefix copied from the cache into a BHSD buffer, then bhsd_lse (what
                    the engine would do to take that path), the copy timed in
    own_causal      the chunk's own c x c causal keys alone (KV heads repeated, as the engine)

    python -m benchmarks.probes.cudnn_layouts --out OUT.json [--prefixes 131072,229376] [--chunks 4096]

Run it once as is and once with `TORCH_CUDNN_SDPA_AVOID_RECOMPILE=0` in the environment
(the engine sets 1 at import unless set): the variable is read by ATen. Needs a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.probes.cudnn_segments import HEAD_DIM, NUM_HEADS, NUM_KV_HEADS, flops, random_caches, timed_ms
from mnemosyne.kernels import DENSE_SEGMENT_TOKENS, EXACT_SEGMENT_KEYS
from mnemosyne.kernels.cudnn_prefill import DenseChunk, _bshd, _cudnn, _repeat_heads, dense_chunk_attention

_aten = torch.ops.aten


def variants(c: int, p: int, k_cache: torch.Tensor, v_cache: torch.Tensor) -> dict[str, Callable[[], object]]:
    """Each variant's call for a c-token chunk after p keys (the module docstring)."""
    dev, g, scale = k_cache.device, NUM_HEADS // NUM_KV_HEADS, HEAD_DIM**-0.5
    num_blocks = k_cache.shape[0]
    table = torch.arange(num_blocks, device=dev, dtype=torch.int32)
    q = torch.randn(c, NUM_HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16)
    out, lse = torch.empty_like(q), torch.empty(c, NUM_HEADS, device=dev, dtype=torch.float32)
    chunk = DenseChunk(0, 0, c, p, True, (0, num_blocks))
    q_fold = _bshd(
        q.view(c, NUM_KV_HEADS, g, HEAD_DIM).permute(2, 0, 1, 3).reshape(1, g * c, NUM_KV_HEADS, HEAD_DIM)
    )
    k_view = _bshd(k_cache.view(-1, NUM_KV_HEADS, HEAD_DIM)[:p].unsqueeze(0))  # [1, Hkv, p, D], BSHD memory
    v_view = _bshd(v_cache.view(-1, NUM_KV_HEADS, HEAD_DIM)[:p].unsqueeze(0))
    q_bhsd, k_bhsd, v_bhsd = q_fold.contiguous(), k_view.contiguous(), v_view.contiguous()  # [1, Hkv, n, D]
    own = _bshd(k_cache.view(-1, NUM_KV_HEADS, HEAD_DIM)[p : p + c].unsqueeze(0))
    own_k = _repeat_heads(own, g)
    q_own = _bshd(q.unsqueeze(0))

    def sdpa(qq: torch.Tensor, kk: torch.Tensor, vv: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(qq, kk, vv, scale=scale)

    def bhsd_lse() -> object:
        return _aten._scaled_dot_product_cudnn_attention(
            q_bhsd, k_bhsd, v_bhsd, None, True, 0.0, False, False, scale=scale
        )

    def bhsd_copy_lse() -> object:
        k_bhsd.copy_(k_view)
        v_bhsd.copy_(v_view)
        return bhsd_lse()

    exact_chunk = DenseChunk(0, 0, c, p, True, (0, num_blocks), exact_keys=EXACT_SEGMENT_KEYS)
    return {
        "engine": lambda: dense_chunk_attention(
            q, k_cache, v_cache, table, chunk, scale, DENSE_SEGMENT_TOKENS, out, lse
        ),
        "engine_exact": lambda: dense_chunk_attention(
            q, k_cache, v_cache, table, exact_chunk, scale, DENSE_SEGMENT_TOKENS, out, lse
        ),
        "exact": lambda: _cudnn(q_bhsd, k_view, v_view, False, scale),
        "bshd_lse": lambda: _cudnn(q_fold, k_view, v_view, False, scale),
        "bshd": lambda: sdpa(q_fold, k_view, v_view),
        "bhsd": lambda: sdpa(q_bhsd, k_bhsd, v_bhsd),
        "bhsd_lse": bhsd_lse,
        "bhsd_copy_lse": bhsd_copy_lse,
        "own_causal": lambda: _cudnn(q_own, own_k, own_k, True, scale),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prefixes", default="131072,229376")
    ap.add_argument("--chunks", default="4096")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--out", type=Path, required=True)
    ns = ap.parse_args()
    dev = torch.device("cuda")
    prefixes = [int(x) for x in ns.prefixes.split(",")]
    chunks = [int(x) for x in ns.chunks.split(",")]
    k_cache, v_cache = random_caches(max(prefixes) + max(chunks), dev)
    rows = []
    for c in chunks:
        for p in prefixes:
            row: dict = {"c": c, "prefix": p}
            for name, fn in variants(c, p, k_cache, v_cache).items():
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()  # the first call: builds the call's cuDNN graph unless one fits
                torch.cuda.synchronize()
                row[f"{name}_first_ms"] = round((time.perf_counter() - t0) * 1e3, 1)
                ms = timed_ms(fn, ns.repeats)
                whole = name.startswith("engine")
                work = flops(c, p) if whole else flops(c, 0) if name == "own_causal" else flops(c, p) - flops(c, 0)
                row[f"{name}_ms"] = round(ms, 3)
                row[f"{name}_tflops"] = round(work / ms / 1e9, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()
    ns.out.write_text(json.dumps({
        "probe": "cudnn_layouts", "date": datetime.now(UTC).isoformat(), "device": torch.cuda.get_device_name(),
        "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
        "avoid_recompile": os.environ.get("TORCH_CUDNN_SDPA_AVOID_RECOMPILE"),
        "args": vars(ns) | {"out": str(ns.out)}, "rows": rows,
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
