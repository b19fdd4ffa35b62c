"""Launch-shape arithmetic on the host, in plain Python.

Triton 3.6 makes `triton.cdiv` and `triton.next_power_of_2` constexpr functions: called from
host code each costs ~3 us of argument unwrapping, and a chunk step's attention wrappers
made seven such calls per layer (~20 us of the ~33 us of Python per layer measured on CPU
with the launches stubbed out). These are the same functions without that.
"""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n, as `triton.next_power_of_2` (which gives 0 for 0)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def chunk_tile_tokens(num_queries_per_kv: int, dtype_bytes: int) -> int:
    """Query tokens per tile of the chunk kernels: a tile packs tokens x the query heads of one
    KV head into about 128 rows (16-bit) or 32 (float32)."""
    return max(1, (128 if dtype_bytes <= 2 else 32) // num_queries_per_kv)


def padded_chunk_tokens(num_tokens: int, tile_tokens: int) -> int:
    """The query tokens a chunk's tiles cover: one half-height tile up to tile_tokens // 2
    (`KernelBackend.tile_heights`), else whole tiles. Every covered row, padding included,
    runs the tile's whole key loop: on an H200 (8B, after 240K keys) a 48-token chunk costs
    what a 64-token one does (benchmarks/results/session20_h200_2026-12-01/a/)."""
    half = max(1, tile_tokens // 2)
    return half if num_tokens <= half else cdiv(num_tokens, tile_tokens) * tile_tokens


CONFINED_BOX_KEYS = 64  # keys per TMA box of the decode launch on a lane split


def confined_decode_boxes(head_dim: int, dtype_bytes: int, block_size: int) -> bool:
    """Whether the decode kernel on a lane split's few SMs loads its K/V tiles as TMA boxes
    (`decode_launch.launch_options`, on sm_90+): 16-bit, a power-of-two head dim over 64,
    and pages of whole 64-key boxes. The steps' latency model beside a lane chunk reads the
    keys' rate by it (`latency/beside_lane.py`)."""
    power_of_two = head_dim & (head_dim - 1) == 0
    return dtype_bytes == 2 and head_dim > 64 and power_of_two and block_size % CONFINED_BOX_KEYS == 0


__all__ = [
    "CONFINED_BOX_KEYS",
    "cdiv",
    "chunk_tile_tokens",
    "confined_decode_boxes",
    "next_power_of_2",
    "padded_chunk_tokens",
]
