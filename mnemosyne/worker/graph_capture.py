"""What the worker's three kinds of CUDA graphs share (`cuda_graph.py`, `mixed_graph.py`,
`piecewise_graph.py`): capturing one callable after an eager warm-up run, and the block
capacity of the graphs that replay attention over the paged cache."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from mnemosyne.config import EngineConfig
from mnemosyne.models.llama import KVCache

T = TypeVar("T")


def capture_graph(
    fn: Callable[[], T], pool: tuple[int, int] | None, stream: torch.cuda.Stream | None = None
) -> tuple[torch.cuda.CUDAGraph, T]:
    """(graph, output of the captured call): `fn` runs once eagerly first (Triton's JIT,
    cuBLAS handles; its outputs are overwritten by every replay), then is captured into
    `pool` (the caller keeps `graph.pool()` for the next capture) on `stream` (None: torch's
    side stream). A graph's kernels keep the SMs of the stream it was captured on, whatever
    stream replays it: one captured on a green context's stream stays on that context's SMs
    (worker/prefill_lane.py), one captured on a plain stream takes every SM."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=stream):
        out = fn()
    return graph, out


def attention_graph_blocks(
    config: EngineConfig, kv_caches: list[KVCache], backend: object, device: torch.device
) -> int | None:
    """The block-table width of graphs that run the kernel backend's attention inside them
    (max_model_len in blocks, at most the cache's blocks), or None when there are none: on
    CPU, with the reference backend, or with enforce_eager."""
    if device.type != "cuda" or config.enforce_eager:
        return None
    from mnemosyne.layers.attention.kernel_backend import KernelBackend  # Triton: CUDA installs

    if not isinstance(backend, KernelBackend):
        return None
    block_size = config.cache.block_size
    num_blocks = kv_caches[0][0].shape[0] if kv_caches else 1
    return min(-(-config.scheduler.max_model_len // block_size), num_blocks)
