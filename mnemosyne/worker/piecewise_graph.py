"""Piecewise CUDA graphs: one stage's forward with everything but attention replayed from
graphs, for steps that the whole-model decode graphs cannot take (prefill chunks, mixed
steps, rows merged across KVP groups).

An eager step launches ~15 small kernels per layer from Python; at a few hundred tokens
that host time, not the GPU, sets the step time. Attention cannot be captured once for all
steps (its plan, kernels and grids follow each step's chunks, and the KVP merge's
all-gather varies), but the rest of a layer is row-wise and depends only on the number of
rows. So a stage of L layers is cut at its attention calls into L + 1 pieces::

    piece 0:   x = embed(input)             ; q, k, v, r = layers[0].pre_attention(x)
    attn 0:    out = attention(q, k, v)      (eager: KV write, kernels, KVP merge)
    piece i:   x, r = layers[i-1].post_attention(out, r) ; q, k, v, r = layers[i].pre_attention(x, r)
    attn i:    ...
    piece L:   x, r = layers[L-1].post_attention(out, r) ; hidden = finish(x, r)

and each piece is captured once per padded size T (`piecewise_sizes`). Pieces talk
through static buffers, rows [0, T) of each::

    input_ids | hidden  [max_tokens] | [max_tokens, hidden]   rows [n, T) zero (ids, hidden)
    positions           [max_tokens]                          rows [n, T) 0
    q, k, v             [max_tokens, heads, head_dim]          written by piece i, read by attn i
    attn_out            [max_tokens, num_heads, head_dim]      rows [0, n) written by attn i
    residual            [max_tokens, hidden]                   carried from piece to piece
    output              [max_tokens, hidden]                   written by piece L

A step of n tokens runs on T = the smallest size >= n. Rows [n, T) are padding: every op
in a piece is row-wise, so they never touch rows [0, n); attention only sees rows [0, n).
The graphs read nothing that changes between steps but these buffers and the weights.

Every piece is run once eagerly before its capture (Triton JIT, cuBLAS handles), and all
sizes are captured at start-up (`capture_all`), so serving never captures. Every TP rank
captures the same pieces in the same order, so the TP all-reduces inside them line up.
Without CUDA (tests on CPU) the same pieces run eagerly on the same padded buffers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mnemosyne.config import EngineConfig
from mnemosyne.layers.attention.metadata import AttentionMetadata
from mnemosyne.models.llama import KVCache, LlamaForCausalLM
from mnemosyne.worker.graph_capture import capture_graph

# Larger steps launch eagerly. On an H200 the 8B shape is device-bound at every size and the 1B
# shape from about 2K tokens; graphs above that cost 2-3.5% of device time in the copies into
# their static buffers. Below it they would save the 1B shape 2.3 ms on a 1.2K-token step.
# (benchmarks/results/session11_h200x2_2026-11-30/eager_launch_host_*.json)
MAX_PIECEWISE_TOKENS = 1024


def max_piecewise_step_tokens(max_num_batched_tokens: int) -> int:
    """The largest step the piecewise graphs replay under this step budget (a multiple of 8)."""
    return -(-min(max_num_batched_tokens, MAX_PIECEWISE_TOKENS) // 8) * 8


def piecewise_sizes(max_tokens: int) -> list[int]:
    """Padded step sizes: 8..64 by 8, 80..256 by 16, 288..512 by 32, 576..1024 by 64, up to
    and including `max_tokens`. A step of n >= 64 tokens pads by under 25% (under 13% from
    256 up, where matmuls become compute-bound and padded rows cost time)."""
    grid = [*range(8, 65, 8), *range(80, 257, 16), *range(288, 513, 32), *range(576, 1025, 64)]
    return [t for t in grid if t < max_tokens] + [max_tokens]


class PiecewiseGraphs:
    def __init__(
        self,
        model: LlamaForCausalLM,
        max_tokens: int,
        device: torch.device,
        pool: tuple[int, int] | None = None,
    ) -> None:
        cfg = model.config
        self.model = model
        self.sizes = piecewise_sizes(max_tokens)
        self.max_tokens = max_tokens
        self.use_graphs = device.type == "cuda"
        attn = model.layers[0].self_attn
        num_heads, num_kv_heads, head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        with torch.device(device):
            if model.is_first_stage:
                self.input_ids = torch.zeros(max_tokens, dtype=torch.long)
            else:
                self.hidden = torch.zeros(max_tokens, cfg.hidden_size, dtype=cfg.dtype)
            self.positions = torch.zeros(max_tokens, dtype=torch.long)
            self.q = torch.zeros(max_tokens, num_heads, head_dim, dtype=cfg.dtype)
            self.k = torch.zeros(max_tokens, num_kv_heads, head_dim, dtype=cfg.dtype)
            self.v = torch.zeros(max_tokens, num_kv_heads, head_dim, dtype=cfg.dtype)
            self.attn_out = torch.zeros(max_tokens, num_heads, head_dim, dtype=cfg.dtype)
            self.residual = torch.zeros(max_tokens, cfg.hidden_size, dtype=cfg.dtype)
            self.output = torch.zeros(max_tokens, cfg.hidden_size, dtype=cfg.dtype)
        self.pool = pool
        self.pieces: dict[int, list[Callable[[], object]]] = {}  # size -> L + 1 replays (or eager runs)
        self.num_replays = 0  # steps run here (benchmarks read it)

    @classmethod
    def create(
        cls, config: EngineConfig, model: LlamaForCausalLM, device: torch.device, pool: tuple[int, int] | None
    ) -> PiecewiseGraphs | None:
        """Graphs for this worker, or None (CPU or enforce_eager)."""
        if device.type != "cuda" or config.enforce_eager:
            return None
        return cls(model, max_piecewise_step_tokens(config.scheduler.max_num_batched_tokens), device, pool)

    def can_run(self, num_tokens: int) -> bool:
        return 0 < num_tokens <= self.max_tokens

    # ---- the pieces ---------------------------------------------------------------------

    def _piece_fns(self, size: int) -> list[Callable[[], None]]:
        """The L + 1 pieces at padded size `size`, as closures over the static buffers."""
        model, layers = self.model, self.model.layers
        positions = self.positions[:size]
        q, k, v = self.q[:size], self.k[:size], self.v[:size]
        attn_out, residual = self.attn_out[:size], self.residual[:size]
        inp = (self.input_ids if model.is_first_stage else self.hidden)[:size]

        def store(qkvr: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
            for dst, src in zip((q, k, v, residual), qkvr, strict=True):
                dst.copy_(src)

        def first() -> None:
            store(layers[0].pre_attention(positions, model.embed(inp), None))

        def middle(i: int) -> Callable[[], None]:
            def piece() -> None:
                x, r = layers[i - 1].post_attention(attn_out, residual)
                store(layers[i].pre_attention(positions, x, r))

            return piece

        def last() -> None:
            x, r = layers[-1].post_attention(attn_out, residual)
            self.output[:size].copy_(model.finish(x, r))

        return [first, *(middle(i) for i in range(1, len(layers))), last]

    def _build(self, size: int) -> list[Callable[[], object]]:
        fns = self._piece_fns(size)
        if not self.use_graphs:
            return list(fns)
        replays: list[Callable[[], object]] = []
        for fn in fns:
            graph, _ = capture_graph(fn, self.pool)
            self.pool = graph.pool()
            replays.append(graph.replay)
        return replays

    def capture_all(self) -> None:
        """Capture every size (largest first, so the pool reaches its peak at once)."""
        for size in sorted(self.sizes, reverse=True):
            self.pieces[size] = self._build(size)

    # ---- a step -------------------------------------------------------------------------

    @torch.inference_mode()
    def run(
        self,
        x: torch.Tensor,  # first stage: [n] token ids; else [n, hidden]
        positions: torch.Tensor,  # [n]
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """The stage's output for the n rows: [n, hidden_size] (a view of a static buffer,
        valid until the next run)."""
        n = x.shape[0]
        size = next(s for s in self.sizes if s >= n)
        self.num_replays += 1
        inp = self.input_ids if self.model.is_first_stage else self.hidden
        inp[:n].copy_(x)
        inp[n:size].zero_()
        self.positions[:n].copy_(positions)
        self.positions[n:size].zero_()
        pieces = self.pieces[size]
        for i, layer in enumerate(self.model.layers):
            pieces[i]()
            out = layer.self_attn.attn(self.q[:n], self.k[:n], self.v[:n], kv_caches[i], meta)
            self.attn_out[:n].copy_(out)  # [n, num_heads, head_dim]
        pieces[-1]()
        return self.output[:n]

    def close(self) -> None:
        """Drop the graphs (before the process group is destroyed)."""
        if self.use_graphs:
            torch.cuda.synchronize()
        self.pieces.clear()
