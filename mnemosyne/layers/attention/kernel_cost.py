"""Which kernel serves a prefill chunk: the one with the lower measured cost.

A chunk of c queries whose keys number n (prefix plus its own keys) costs, per layer, on
each path (`ChunkPath`)::

    t(c, n) = fixed(c) + n * per_key(c) * (num_heads * head_dim) / (H_cal * D_cal)

fixed and per_key were fitted by least squares over the prefixes of a GPU sweep
(`benchmarks/chunk_sweep.py --calibrate`, committed under benchmarks/results/) for each
measured chunk length, on the calibration shape H_cal x D_cal; between two measured
lengths both are interpolated linearly in c, beyond the largest per_key grows in
proportion to c (compute-bound), below the smallest it stays (bandwidth-bound). The
split-KV Triton kernel fills the GPU at any c; cuDNN has a host cost per call (three
calls per chunk) and few programs for short chunks, which the fixed term and per_key
carry.
"""

from __future__ import annotations

import bisect
import enum
from dataclasses import dataclass


class ChunkPath(enum.Enum):
    TRITON_SPLITKV = "triton_splitkv"  # kernels/chunk_splitkv_attention.py
    CUDNN = "cudnn"  # kernels/cudnn_prefill.py


@dataclass(frozen=True)
class PathCost:
    """Per-layer cost of one path at the measured chunk lengths (ascending)."""

    chunks: tuple[int, ...]
    fixed_s: tuple[float, ...]
    per_key_s: tuple[float, ...]

    def check_integrity(self) -> None:
        if not (len(self.chunks) == len(self.fixed_s) == len(self.per_key_s) >= 1):
            raise ValueError(f"mismatched calibration lengths: {self}")
        if list(self.chunks) != sorted(set(self.chunks)) or self.chunks[0] < 1:
            raise ValueError(f"chunk lengths must ascend from >= 1: {self.chunks}")

    def seconds(self, chunk: int, keys: int, shape_factor: float) -> float:
        cs = self.chunks
        if chunk <= cs[0]:
            fixed, per_key = self.fixed_s[0], self.per_key_s[0]
        elif chunk >= cs[-1]:
            fixed, per_key = self.fixed_s[-1], self.per_key_s[-1] * chunk / cs[-1]
        else:
            i = bisect.bisect_right(cs, chunk) - 1
            w = (chunk - cs[i]) / (cs[i + 1] - cs[i])
            fixed = self.fixed_s[i] + w * (self.fixed_s[i + 1] - self.fixed_s[i])
            per_key = self.per_key_s[i] + w * (self.per_key_s[i + 1] - self.per_key_s[i])
        return max(fixed, 0.0) + keys * max(per_key, 0.0) * shape_factor


@dataclass(frozen=True)
class ChunkCostModel:
    """Measured costs of both paths on one GPU kind, for one calibration shape."""

    triton: PathCost
    cudnn: PathCost
    num_heads: int  # H_cal
    head_dim: int  # D_cal
    source: str  # the committed result the numbers come from

    def check_integrity(self) -> None:
        self.triton.check_integrity()
        self.cudnn.check_integrity()

    def seconds(self, path: ChunkPath, chunk: int, keys: int, num_heads: int, head_dim: int) -> float:
        factor = num_heads * head_dim / (self.num_heads * self.head_dim)
        cost = self.triton if path is ChunkPath.TRITON_SPLITKV else self.cudnn
        return cost.seconds(chunk, keys, factor)

    def cheaper(self, chunk: int, keys: int, num_heads: int, head_dim: int) -> ChunkPath:
        t = self.seconds(ChunkPath.TRITON_SPLITKV, chunk, keys, num_heads, head_dim)
        c = self.seconds(ChunkPath.CUDNN, chunk, keys, num_heads, head_dim)
        return ChunkPath.CUDNN if c < t else ChunkPath.TRITON_SPLITKV


# Placeholder until the H200 calibration below is committed (see module docstring).
H200_COST = ChunkCostModel(
    triton=PathCost(
        chunks=(16, 32, 64, 128, 256, 512, 2048),
        fixed_s=(10e-6,) * 7,
        per_key_s=(1.0e-9, 1.1e-9, 3.5e-9, 7e-9, 14e-9, 28e-9, 112e-9),
    ),
    cudnn=PathCost(
        chunks=(16, 32, 64, 128, 256, 512, 2048),
        fixed_s=(300e-6,) * 7,
        per_key_s=(4e-9, 4e-9, 6e-9, 8e-9, 12e-9, 16e-9, 56e-9),
    ),
    num_heads=32,
    head_dim=128,
    source="estimate (not measured)",
)
