"""Which kernel serves a prefill chunk: the one with the lower measured cost.

A chunk of c queries whose keys number n (prefix plus its own keys) costs, per layer, on
each path (`ChunkPath`)::

    t(c, n) = max(fixed(c), n * per_key(c) * (num_heads * head_dim) / (H_cal * D_cal))

the larger of a floor that does not grow with the keys (launches, and for cuDNN about
1 ms of host work per chunk and layer: its calls, the split merge, the segment merges)
and the GPU time, which grows linearly with the keys. cuDNN's floor was timed on one
layer's attention alone; inside a whole step the step's other host work runs beside it,
so `cheaper` scales it by `cudnn_host_in_step` (measured on an H200, below). From one
layer's attention timed by `benchmarks/chunk_sweep.py` (part "calib", committed under benchmarks/results/
chunk_sweep/) on the calibration shape H_cal x D_cal: fixed = the time after the
shortest calibration prefix, per_key = the time after the longest / its keys, for each
measured chunk length. Between two measured lengths both are interpolated linearly in
c; beyond the largest per_key grows in proportion to c (compute-bound), below the
smallest it stays (bandwidth-bound).
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

    def to_dict(self) -> dict:
        return {"chunks": list(self.chunks), "fixed_s": list(self.fixed_s), "per_key_s": list(self.per_key_s)}

    @classmethod
    def from_dict(cls, d: dict) -> PathCost:
        cost = cls(tuple(int(c) for c in d["chunks"]), tuple(map(float, d["fixed_s"])), tuple(map(float, d["per_key_s"])))
        cost.check_integrity()
        return cost

    def at(self, chunk: int) -> tuple[float, float]:
        """(fixed seconds, seconds per key) of a chunk of this length, on the calibration shape."""
        cs = self.chunks
        if chunk <= cs[0]:
            return self.fixed_s[0], self.per_key_s[0]
        if chunk >= cs[-1]:
            return self.fixed_s[-1], self.per_key_s[-1] * chunk / cs[-1]
        i = bisect.bisect_right(cs, chunk) - 1
        w = (chunk - cs[i]) / (cs[i + 1] - cs[i])
        fixed = self.fixed_s[i] + w * (self.fixed_s[i + 1] - self.fixed_s[i])
        return fixed, self.per_key_s[i] + w * (self.per_key_s[i + 1] - self.per_key_s[i])

    def seconds(self, chunk: int, keys: int, shape_factor: float, fixed_scale: float = 1.0) -> float:
        """max(fixed x fixed_scale, keys x per-key cost x shape_factor), per layer."""
        fixed, per_key = self.at(chunk)
        return max(fixed * fixed_scale, keys * per_key * shape_factor)


@dataclass(frozen=True)
class ChunkCostModel:
    """Measured costs of both paths on one GPU kind, for one calibration shape. The Triton
    path has two kernels: per-key gathers (`triton`) and page-aligned steps
    (`triton_page_tiles`, when the cache's block size allows it; None: as `triton`)."""

    triton: PathCost
    cudnn: PathCost
    num_heads: int  # H_cal
    head_dim: int  # D_cal
    source: str  # the committed result the numbers come from
    triton_page_tiles: PathCost | None = None
    cudnn_host_in_step: float = 1.0  # cuDNN's fixed (host) seconds inside a step / alone
    # Up to this chunk length cuDNN's per-key cost at a head dim below D_cal is D_cal's (not
    # scaled down with the head dim): `path_shape_factor`. 0: always scaled.
    cudnn_small_head_max_chunk: int = 0

    def check_integrity(self) -> None:
        self.triton.check_integrity()
        self.cudnn.check_integrity()
        if self.triton_page_tiles is not None:
            self.triton_page_tiles.check_integrity()
        if self.cudnn_host_in_step < 1.0:
            raise ValueError(f"cudnn_host_in_step must be >= 1, got {self.cudnn_host_in_step}")

    def path_cost(self, path: ChunkPath, page_tiles: bool = False) -> PathCost:
        if path is ChunkPath.CUDNN:
            return self.cudnn
        return self.triton_page_tiles if page_tiles and self.triton_page_tiles is not None else self.triton

    def shape_factor(self, num_heads: int, head_dim: int) -> float:
        """Per-key cost relative to the calibration shape."""
        return num_heads * head_dim / (self.num_heads * self.head_dim)

    def path_shape_factor(self, path: ChunkPath, chunk: int, num_heads: int, head_dim: int) -> float:
        """`shape_factor`, except for cuDNN chunks of at most `cudnn_small_head_max_chunk`
        tokens at a head dim below the calibration's: those cost per key what they cost at
        D_cal (see H200_COST)."""
        small_cudnn = path is ChunkPath.CUDNN and chunk <= self.cudnn_small_head_max_chunk
        return self.shape_factor(num_heads, max(head_dim, self.head_dim) if small_cudnn else head_dim)

    def seconds(
        self, path: ChunkPath, chunk: int, keys: int, num_heads: int, head_dim: int, page_tiles: bool = False
    ) -> float:
        """Per-layer seconds of the chunk on `path` inside a step (cuDNN's host floor scaled)."""
        fixed_scale = self.cudnn_host_in_step if path is ChunkPath.CUDNN else 1.0
        factor = self.path_shape_factor(path, chunk, num_heads, head_dim)
        return self.path_cost(path, page_tiles).seconds(chunk, keys, factor, fixed_scale)

    def to_dict(self) -> dict:
        d = {"triton": self.triton.to_dict(), "cudnn": self.cudnn.to_dict(), "num_heads": self.num_heads,
             "head_dim": self.head_dim, "source": self.source}  # fmt: skip
        if self.triton_page_tiles is not None:
            d["triton_page_tiles"] = self.triton_page_tiles.to_dict()
        d["cudnn_host_in_step"] = self.cudnn_host_in_step
        d["cudnn_small_head_max_chunk"] = self.cudnn_small_head_max_chunk
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ChunkCostModel:
        tiles = d.get("triton_page_tiles")
        return cls(
            triton=PathCost.from_dict(d["triton"]),
            cudnn=PathCost.from_dict(d["cudnn"]),
            num_heads=int(d["num_heads"]),
            head_dim=int(d["head_dim"]),
            source=str(d["source"]),
            triton_page_tiles=None if tiles is None else PathCost.from_dict(tiles),
            cudnn_host_in_step=float(d.get("cudnn_host_in_step", 1.0)),  # older profiles: none
            cudnn_small_head_max_chunk=int(d.get("cudnn_small_head_max_chunk", 0)),  # older profiles: none
        )

    def cheaper(
        self, chunk: int, keys: int, num_heads: int, head_dim: int, page_tiles: bool = False
    ) -> ChunkPath:
        t = self.seconds(ChunkPath.TRITON_SPLITKV, chunk, keys, num_heads, head_dim, page_tiles)
        c = self.seconds(ChunkPath.CUDNN, chunk, keys, num_heads, head_dim)
        return ChunkPath.CUDNN if c < t else ChunkPath.TRITON_SPLITKV


# 1x H200, bf16, 32 / 8 heads, head dim 128 (chunk_sweep_h200_2026-11-29.json, part "calib").
H200_COST = ChunkCostModel(
    triton=PathCost(
        chunks=(16, 32, 64, 128, 256, 512, 2048),
        fixed_s=(0.000201, 0.000112, 0.000114, 0.000116, 0.00024, 0.000327, 0.000989),
        per_key_s=(1.27e-09, 1.89e-09, 3.17e-09, 7.51e-09, 1.38e-08, 2.66e-08, 8.63e-08),
    ),
    cudnn=PathCost(
        chunks=(16, 32, 64, 128, 256, 512, 2048),
        fixed_s=(0.00108, 0.00103, 0.00102, 0.001, 0.00105, 0.00101, 0.000934),
        per_key_s=(5.1e-09, 4.86e-09, 4.8e-09, 5.73e-09, 9.28e-09, 1.53e-08, 5.62e-08),
    ),
    num_heads=32,
    head_dim=128,
    source="benchmarks/results/chunk_sweep/chunk_sweep_h200_2026-11-29.json (calib); page tiles: "
    "benchmarks/results/chunk_kernel_variants_h200_2026-11-29.json",
    # per_key: one layer after 512K keys at about 33 splits (the engine's rule); fixed: the
    # per-key kernel's (same launches; the variants sweep has no short-prefix points).
    triton_page_tiles=PathCost(
        chunks=(16, 32, 64, 128, 256),
        fixed_s=(0.000201, 0.000112, 0.000114, 0.000116, 0.00024),
        per_key_s=(9.88e-10, 1.242e-09, 2.294e-09, 4.34e-09, 9.70e-09),
    ),
    # Measured 1.31: in the 1B mixed scenario (benchmarks/results/session11_h200x2_2026-11-30/
    # mixed_long_short_1b*), runs of piecewise steps with a 256-token chunk on cuDNN after
    # 216-245K keys were host-bound at 26.4 ms a step against 22 ms for the Triton steps
    # beside them: about 1.38 ms of host per layer against the table's 1.05. At head dim
    # 64 both paths cost about 1 ms there, so the table picked cuDNN on a tie of its floor.
    # Rounded up: at a tie the path whose cost is device time, which overlaps host work, wins.
    cudnn_host_in_step=1.35,
    # At head dim 64 (1B heads) cuDNN chunks of 352-384 tokens after 191-210K keys cost per
    # key 0.92-0.96x what the table says at head dim 128, not the 0.5x the head dims' ratio
    # gives: in the 1B mixed scenario (benchmarks/results/session12_h200x2_2026-11-30/a/
    # mixed_1b_steps.jsonl.gz) the same chunk ran 28.8 ms a step on Triton and then 38.3 ms
    # on cuDNN (40.9 ms at 352 after 209K), once the table flipped to cuDNN. So a cuDNN
    # chunk's per-key work does not halve with the head dim: its few programs (c x heads / 128
    # query rows: 96 for 384 tokens, under the H200's 132 SMs) run the same number of
    # exponentials per score. In the 1B serving trace, cuDNN steps with chunks under 1024
    # tokens ran 1.09-1.27x their prediction and from 2048 tokens 0.92-1.05x (c/1b_trace/),
    # hence up to 1024.
    cudnn_small_head_max_chunk=1024,
)
