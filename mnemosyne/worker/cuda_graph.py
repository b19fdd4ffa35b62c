"""CUDA graphs of one stage's forward for decode-only sub-batches.

An eager decode step launches a dozen small kernels per layer and is bound by launch
latency at small batches; a graph replays them all at once. Per step::

    copy the inputs into static buffers (rows [0, n)) -> pad rows [n, bs) -> replay graph[bs, S]
    -> output rows [0, n)

Static buffers, max_batch rows (bs = the padded batch size: 1, 2, 4, 8, then multiples of 8)::

    input_ids | hidden   [max_batch] | [max_batch, hidden]   pad 0
    positions            [max_batch]     also q_pos_start (a decode's query sits at its position)
    kv_start, kv_lens    [max_batch]     pad kv_len 0 -> the row sees no key: out 0, lse -inf
    slot_mapping         [max_batch]     pad -1 -> no KV write
    block_tables         [max_batch, max_blocks]; columns past a sequence's blocks are never read
    query_start_loc      [max_batch + 1] = 0, 1, ..., max_batch (one query per row), fixed
    merge_slots          [max_batch]     with kvp > 1: each row's slot in the KVP merge's shared
                                         buffer (`kvp_merge.py`); pad: the trash slot

The attention plan of a graph (decode kernel, its split budget) is built once, at
capture; the decode kernel reads the lengths from the static tensors and cuts them into
balanced work items itself, so one graph serves every context length.

Every padded size is captured at start-up (`capture_all`), each after an eager warm-up run
on the static buffers as they stand then (every row padding: no key read, no KV written),
so serving never captures. Every TP rank captures the same sizes in the same order, and
the TP all-reduces inside the layers are recorded into the graphs (NCCL supports capture).
Stage-to-stage sends and receives stay outside them.

With KVP, a decode step whose rows are merged across groups replays the graph of
(bs, S), S = padded_shared_tokens(N_s) in 1, 2, 4: the merge's all-gather inside it has
the fixed size merge_buffer_rows(N_s) that every group uses for that step, whichever path
it takes (another group may run a prefill chunk eagerly, or sit idle), so the collectives
match. Graphs of S = 0 have no merge. Steps with more shared tokens take the piecewise
graphs (`piecewise_graph.py`). Every KVP group captures the same (bs, S) in the same
order: each capture's warm-up runs the all-gathers eagerly, together.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from mnemosyne.config import EngineConfig
from mnemosyne.layers.attention.kvp_merge import (
    MAX_GRAPH_SHARED_TOKENS,
    KVPMergeIndex,
    merge_buffer_rows,
    padded_shared_tokens,
)
from mnemosyne.layers.attention.metadata import AttentionMetadata
from mnemosyne.models.llama import KVCache, LlamaForCausalLM
from mnemosyne.worker.graph_capture import attention_graph_blocks, capture_graph

if TYPE_CHECKING:  # the kernels import Triton, which CPU-only installs may lack
    from mnemosyne.layers.attention.kernel_backend import KernelBackend

_MAX_GRAPH_BATCH = 256


def graph_batch_sizes(max_batch: int) -> list[int]:
    sizes = [b for b in (1, 2, 4) if b < max_batch] + list(range(8, max_batch + 8, 8))
    return [b for b in sizes if b < max_batch] + [max_batch]


class DecodeGraphs:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[KVCache],
        backend: KernelBackend,
        max_batch: int,
        max_blocks: int,
        block_size: int,
        device: torch.device,
        kvp: int = 1,
        pool: tuple[int, int] | None = None,
        capture_stream: torch.cuda.Stream | None = None,
    ) -> None:
        """`capture_stream`: the stream to capture on, whose SMs the graphs keep (None: every SM)."""
        cfg = model.config
        self.model = model
        self.kv_caches = kv_caches
        self.backend = backend
        self.max_batch = max_batch
        self.max_blocks = max_blocks
        self.block_size = block_size
        self.sizes = graph_batch_sizes(max_batch)
        # padded shared tokens S of the graphs (0: no KVP merge)
        padded = (
            {padded_shared_tokens(n) for n in range(1, MAX_GRAPH_SHARED_TOKENS + 1)} if kvp > 1 else set()
        )
        self.shared_sizes = sorted({0} | padded)
        self.sliding_window = cfg.sliding_window
        self.num_kv_heads = model.num_local_kv_heads
        with torch.device(device):
            if model.is_first_stage:
                self.input_ids = torch.zeros(max_batch, dtype=torch.long)
            else:
                self.hidden = torch.zeros(max_batch, cfg.hidden_size, dtype=cfg.dtype)
            self.positions = torch.zeros(max_batch, dtype=torch.long)
            self.kv_start = torch.zeros(max_batch, dtype=torch.long)
            self.kv_lens = torch.zeros(max_batch, dtype=torch.int32)
            self.slot_mapping = torch.full((max_batch,), -1, dtype=torch.long)
            self.block_tables = torch.zeros(max_batch, max_blocks, dtype=torch.int32)
            self.query_start_loc = torch.arange(max_batch + 1, dtype=torch.int32)
            self.merge_slots = torch.zeros(max_batch, dtype=torch.long)
        # keyed by (padded batch size bs, padded shared tokens S)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}
        self.metas: dict[tuple[int, int], AttentionMetadata] = {}
        self.pool = pool
        self.capture_stream = capture_stream

    @classmethod
    def create(
        cls,
        config: EngineConfig,
        model: LlamaForCausalLM,
        kv_caches: list[KVCache],
        backend: object,
        device: torch.device,
        pool: tuple[int, int] | None = None,
        capture_stream: torch.cuda.Stream | None = None,
    ) -> DecodeGraphs | None:
        """Graphs for this worker, or None (CPU, the reference backend, or enforce_eager)."""
        max_blocks = attention_graph_blocks(config, kv_caches, backend, device)
        if max_blocks is None:
            return None
        max_batch = min(config.scheduler.max_num_seqs, _MAX_GRAPH_BATCH)
        block_size = config.cache.block_size
        return cls(
            model, kv_caches, backend, max_batch, max_blocks, block_size, device, config.parallel.kvp, pool,
            capture_stream,
        )  # fmt: skip

    def capture_all(self) -> None:
        """Capture every (padded size, shared size), largest first (the pool reaches its peak at
        once). The static buffers hold padding only here, before any step: kv_len 0, slot -1,
        every row in the merge's trash slot."""
        for bs in sorted(self.sizes, reverse=True):
            for shared in self.shared_sizes:
                self._capture(bs, shared)

    def can_run(self, meta: AttentionMetadata) -> bool:
        return (
            0 < meta.num_seqs <= self.max_batch
            and meta.num_tokens == meta.num_seqs  # every sequence has one query: a decode
            and (
                meta.kvp_merge is None
                or padded_shared_tokens(meta.kvp_merge.num_shared_tokens) in self.shared_sizes
            )
            and meta.block_tables.shape[1] <= self.max_blocks
        )

    def run(
        self,
        x: torch.Tensor,  # first stage: [n] token ids; else [n, hidden]
        positions: torch.Tensor,  # [n]
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """The stage's output for the n decode rows: [n, hidden_size]."""
        n = meta.num_seqs
        bs = next(b for b in self.sizes if b >= n)
        shared = 0
        if meta.kvp_merge is not None:
            shared = padded_shared_tokens(meta.kvp_merge.num_shared_tokens)
            self.merge_slots[:n].copy_(meta.kvp_merge.slots)
            self.merge_slots[n:bs].fill_(merge_buffer_rows(shared) - 1)  # padding rows: the trash slot
        inp = self.input_ids if self.model.is_first_stage else self.hidden
        inp[:n].copy_(x)
        self.positions[:n].copy_(positions)
        self.kv_start[:n].copy_(meta.kv_start)
        self.kv_lens[:n].copy_(meta.kv_lens)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.block_tables[:n, : meta.block_tables.shape[1]].copy_(meta.block_tables)
        if n < bs:  # padding rows (none when n is a captured size: 4 fewer calls)
            inp[n:bs].zero_()
            self.positions[n:bs].zero_()
            self.kv_lens[n:bs].zero_()
            self.slot_mapping[n:bs].fill_(-1)
        self.graphs[bs, shared].replay()
        return self.outputs[bs, shared][:n]

    def _meta(self, bs: int, shared: int) -> AttentionMetadata:
        meta = AttentionMetadata(
            query_start_loc=self.query_start_loc[: bs + 1],
            q_pos_start=self.positions[:bs],
            kv_start=self.kv_start[:bs],
            kv_lens=self.kv_lens[:bs],
            block_tables=self.block_tables[:bs],
            slot_mapping=self.slot_mapping[:bs],
            query_lens_cpu=[1] * bs,
            q_pos_start_cpu=[0] * bs,  # host lengths are not used by the decode kernel
            kv_start_cpu=[0] * bs,
            kv_lens_cpu=[0] * bs,
            max_query_len=1,
            max_kv_len=self.max_blocks * self.block_size,
        )
        if shared:
            self.merge_slots[:bs].fill_(merge_buffer_rows(shared) - 1)
            meta.kvp_merge = KVPMergeIndex(num_shared_tokens=shared, slots=self.merge_slots[:bs])
        meta.backend_plan = plan = self.backend.plan(meta, self.num_kv_heads, self.sliding_window)
        plan.decode_confined = self.capture_stream is not None  # a lane split's few SMs
        return meta

    def _capture(self, bs: int, shared: int) -> None:
        meta = self.metas[bs, shared] = self._meta(bs, shared)
        inp = (self.input_ids if self.model.is_first_stage else self.hidden)[:bs]
        positions = self.positions[:bs]
        graph, self.outputs[bs, shared] = capture_graph(
            lambda: self.model(inp, positions, self.kv_caches, meta), self.pool, self.capture_stream
        )
        self.pool = graph.pool()
        self.graphs[bs, shared] = graph

    def close(self) -> None:
        """Drop the graphs (before the process group is destroyed)."""
        torch.cuda.synchronize()
        self.graphs.clear()
        self.outputs.clear()
        self.metas.clear()
