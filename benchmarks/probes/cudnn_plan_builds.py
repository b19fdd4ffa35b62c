"""What a cuDNN attention call costs the first time its shape is seen while serving (GPU).

PyTorch keeps one cuDNN graph per call shape and builds it on the first call (thread-local
cache, `aten/src/ATen/native/cudnn/MHA.cpp`). With `TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1` (set
by `kernels/cudnn_prefill.py`) the key rounds the query and key lengths up to powers of two
and keeps the batch, heads, head dim, dtype and the causal flag. The serving traces of
2026-11-30 showed sporadic steps 2-5x their prediction (50-100 ms extra) as long prompts
grew, and a first call of 1.2 s. This probe times, in one fresh process, the first and the
second call of each shape the engine's cuDNN path issues (`dense_chunk_attention`: the
folded prefix, batched over its splits or one segment, and the causal own keys), so the
build cost per shape and the bucket rule are measured, not assumed:

    python -m benchmarks.probes.cudnn_plan_builds --out OUT.json [--head-dim 128]
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from mnemosyne.kernels.cudnn_prefill import _bshd, _cudnn


def _timed_call(batch: int, heads: int, s_q: int, s_kv: int, head_dim: int, causal: bool) -> float:
    """Seconds of one `_cudnn` call of this shape (inputs made before the clock starts)."""
    q = torch.randn(batch, s_q, heads, head_dim, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(batch, s_kv, heads, head_dim, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    _cudnn(_bshd(q), _bshd(k), _bshd(v), causal, head_dim**-0.5)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--group", type=int, default=4, help="query heads per KV head")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    d, hkv, g = args.head_dim, args.kv_heads, args.group
    # (batch, heads, s_q, s_kv, causal): the folded prefix has Hkv heads and G*c queries,
    # the own keys H heads and c x c causal. Pairs in one power-of-two bucket come in a row.
    shapes = [
        (1, hkv, g * 256, 5000, False),  # the first call of the process
        (1, hkv, g * 256, 6000, False),  # same buckets (1024, 8192)
        (1, hkv, g * 300, 7000, False),  # s_q 1200 -> bucket 2048
        (1, hkv, g * 256, 9000, False),  # s_kv bucket 16384
        (1, hkv, g * 256, 70000, False),  # 131072
        (1, hkv, g * 256, 100000, False),  # same bucket
        (2, hkv, g * 256, 50000, False),  # batched splits: batch 2
        (4, hkv, g * 256, 50000, False),  # batch 4
        (4, hkv, g * 256, 60000, False),  # same bucket
        (1, hkv * g, 256, 256, True),  # own keys
        (1, hkv * g, 300, 300, True),  # bucket 512
        (1, hkv * g, 400, 400, True),  # same bucket
        (1, hkv * g, 2048, 2048, True),
        (1, hkv * g, 8448, 8448, True),
    ]
    rows = []
    for batch, heads, s_q, s_kv, causal in shapes:
        first = _timed_call(batch, heads, s_q, s_kv, d, causal)
        second = _timed_call(batch, heads, s_q, s_kv, d, causal)
        row = {"batch": batch, "heads": heads, "s_q": s_q, "s_kv": s_kv, "causal": causal,
               "first_ms": first * 1e3, "second_ms": second * 1e3}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "command": "python -m benchmarks.probes.cudnn_plan_builds " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        ),
        "device": torch.cuda.get_device_name(),
        "date": datetime.now(UTC).date().isoformat(),
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "head_dim": d,
        "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
