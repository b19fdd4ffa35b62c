"""CUDA graphs of whole small steps with prefill chunks: decodes and chunks, attention included.

The piecewise graphs (`piecewise_graph.py`) replay everything but attention, which they
launch eagerly in every layer (KV write, chunk kernel, split merge, decode kernel): ~0.3 ms
of host time per layer, more than the GPU work of a short step. Here the whole stage's
forward of a step of n <= T tokens is one graph per padded size T (`piecewise_sizes`), with
the attention kernels' plan fixed at capture (`layers/attention/static_plan.py`): one per
size, tile height (full, or half for steps whose chunks all fit half a tile) and split
count (the most, or one for steps whose eager plan takes one split).

Static buffers (rows beyond the step's are padding; views [:T] per graph)::

    input_ids | hidden   [max_tokens] | [max_tokens, hidden]    rows [n, T) 0
    positions            [max_tokens]                            rows [n, T) 0
    slot_mapping         [max_tokens]                            rows [n, T) -1: no KV write
    query_start_loc      [max_tokens + 1]  sequences [0, s) as the step's; entries past s are
    q_pos_start, kv_start, kv_lens  [max_tokens]                 never read (no tile, decode
    block_tables         [max_seqs, max_blocks]                  or merge row names them)
    plan lists           StaticPlans.buffer (decode ids, tiles, merge rows; -1 = padding)

max_seqs = min(max_tokens, the scheduler's max_num_seqs): a step never holds more sequences,
and the block tables are the one large buffer (max_blocks is the cache's whole block count);
a step of more sequences than max_seqs (none the scheduler makes) is left to the other paths.

A step runs here when it has no row merged across KVP groups (the merge's all-gather varies)
and its host plan sends no chunk to cuDNN (its plans follow the shapes) and fits the
graph's fixed lists (`StaticPlans.fits`); otherwise the piecewise graphs take it, with the
plan built here. Decode-only steps take the decode graphs (`cuda_graph.py`).

Every size is captured at start-up after an eager warm-up run on the static buffers (all
padding: nothing read or written in the cache), so serving never captures or compiles.
Every TP rank plans from the same host lists, so all choose the same graph. Without CUDA
(tests on CPU, kernels under the Triton interpreter) each size runs eagerly on the same
static buffers and fixed plans.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from mnemosyne.config import EngineConfig
from mnemosyne.layers.attention.metadata import AttentionMetadata
from mnemosyne.models.llama import KVCache, LlamaForCausalLM
from mnemosyne.worker.graph_capture import attention_graph_blocks, capture_graph
from mnemosyne.worker.piecewise_graph import piecewise_sizes

if TYPE_CHECKING:  # the kernels import Triton, which CPU-only installs may lack
    from mnemosyne.layers.attention.kernel_backend import KernelBackend
    from mnemosyne.layers.attention.static_plan import StaticPlans

# Larger steps launch piecewise or eagerly. Up to this size a step runs here when its plan
# fits (over MAX_SPLIT_GRAPH_TOKENS only with one split): a new prompt's 992-token first chunk
# beside decodes held the 1B shape's host 6.6-14 ms (median by lease) in the piecewise graphs'
# eager attention, more than the GPU's work, and the decodes' tokens were read that late; the
# call that launches it here takes 2.2-2.7 ms (H200, benchmarks/results/session16_h200_2026-11-30/).
MAX_MIXED_GRAPH_TOKENS = 1024


class MixedGraphs:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[KVCache],
        backend: KernelBackend,
        max_tokens: int,
        max_blocks: int,
        block_size: int,
        device: torch.device,
        pool: tuple[int, int] | None = None,
        max_seqs: int | None = None,
        capture_stream: torch.cuda.Stream | None = None,
        num_sms: int | None = None,
    ) -> None:
        """`capture_stream`: the stream to capture on, whose SMs the graphs keep (None: every
        SM); `num_sms`: how many those are (the steps' key splits are planned for them)."""
        from mnemosyne.layers.attention.static_plan import StaticPlans

        cfg = model.config
        self.model = model
        self.kv_caches = kv_caches
        self.backend = backend
        self.max_tokens = max_tokens
        self.max_blocks = max_blocks
        self.max_seqs = max_tokens if max_seqs is None else min(max_seqs, max_tokens)
        self.block_size = block_size
        self.sizes = piecewise_sizes(max_tokens)
        self.sliding_window = cfg.sliding_window
        self.num_kv_heads = model.num_local_kv_heads
        self.num_sms = num_sms
        self.plans: StaticPlans = StaticPlans(backend, max_tokens, self.num_kv_heads, block_size, device, num_sms)
        with torch.device(device):
            if model.is_first_stage:
                self.input_ids = torch.zeros(max_tokens, dtype=torch.long)
            else:
                self.hidden = torch.zeros(max_tokens, cfg.hidden_size, dtype=cfg.dtype)
            self.positions = torch.zeros(max_tokens, dtype=torch.long)
            self.slot_mapping = torch.full((max_tokens,), -1, dtype=torch.long)
            self.query_start_loc = torch.zeros(max_tokens + 1, dtype=torch.int32)
            self.q_pos_start = torch.zeros(max_tokens, dtype=torch.long)
            self.kv_start = torch.zeros(max_tokens, dtype=torch.long)
            self.kv_lens = torch.zeros(max_tokens, dtype=torch.int32)
            self.block_tables = torch.zeros(self.max_seqs, max_blocks, dtype=torch.int32)
        self.use_graphs = device.type == "cuda"
        # keyed by (padded size, tile height, split count)
        self.graphs: dict[tuple[int, int, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int, int], torch.Tensor] = {}
        self.metas: dict[tuple[int, int, int], AttentionMetadata] = {}
        self.num_replays = 0  # steps run here (benchmarks and tests read it)
        self.num_not_fitting = 0  # steps left to the other paths: a chunk on cuDNN, or too many tiles / rows
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
        num_sms: int | None = None,
    ) -> MixedGraphs | None:
        """Graphs for this worker, or None (CPU, the reference backend, or enforce_eager);
        `capture_stream` and `num_sms` as in `__init__`."""
        max_blocks = attention_graph_blocks(config, kv_caches, backend, device)
        if max_blocks is None:
            return None
        max_tokens = min(config.scheduler.max_num_batched_tokens, MAX_MIXED_GRAPH_TOKENS)
        return cls(
            model,
            kv_caches,
            backend,
            -(-max_tokens // 8) * 8,
            max_blocks,
            config.cache.block_size,
            device,
            pool,
            max_seqs=config.scheduler.max_num_seqs,
            capture_stream=capture_stream,
            num_sms=num_sms,
        )

    def capture_all(self) -> None:
        """Capture every padded size, largest first (the pool reaches its peak at once); on
        CPU, only build each size's fixed plan."""
        for size in sorted(self.sizes, reverse=True):
            for block_q in self.plans.tile_heights:
                for splits in self.plans.split_counts_for(size):
                    self._capture((size, block_q, splits))

    # ---- a step -------------------------------------------------------------------------

    def try_run(
        self,
        x: torch.Tensor,  # first stage: [n] token ids; else [n, hidden]
        positions: torch.Tensor,  # [n]
        meta: AttentionMetadata,
    ) -> torch.Tensor | None:
        """The stage's output for the step's n rows ([n, hidden_size], a view of a static
        buffer valid until the next step), or None when the step does not fit a graph; then
        `meta.backend_plan` holds the eager plan (the piecewise graphs or the eager model
        run the step)."""
        n, num_seqs = meta.num_tokens, meta.num_seqs
        if not (
            0 < n <= self.max_tokens
            and num_seqs <= self.max_seqs
            and meta.kvp_merge is None
            and meta.max_query_len > 1
            and meta.block_tables.shape[1] <= self.max_blocks
        ):
            return None
        size = next(s for s in self.sizes if s >= n)
        host = self.backend.host_plan(meta, self.num_kv_heads, self.sliding_window, self.block_size, self.num_sms)
        if not self.plans.fits(size, host):
            self.num_not_fitting += 1
            meta.backend_plan = self.backend.device_plan(host, self.num_kv_heads)
            return None
        inp = self.input_ids if self.model.is_first_stage else self.hidden
        inp[:n].copy_(x)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.query_start_loc[: num_seqs + 1].copy_(meta.query_start_loc)
        self.q_pos_start[:num_seqs].copy_(meta.q_pos_start)
        self.kv_start[:num_seqs].copy_(meta.kv_start)
        self.kv_lens[:num_seqs].copy_(meta.kv_lens)
        self.block_tables[:num_seqs, : meta.block_tables.shape[1]].copy_(meta.block_tables)
        if n < size:  # padding rows: no KV write
            inp[n:size].zero_()
            self.positions[n:size].zero_()
            self.slot_mapping[n:size].fill_(-1)
        self.plans.fill(size, host)
        self.num_replays += 1
        key = (size, host.block_q, self.plans.splits_for(host))
        if not self.use_graphs:
            return self._forward(key)[:n]
        self.graphs[key].replay()
        return self.outputs[key][:n]

    # ---- capture ------------------------------------------------------------------------

    def _meta(self, key: tuple[int, int, int]) -> AttentionMetadata:
        size, block_q, splits = key
        meta = AttentionMetadata(
            query_start_loc=self.query_start_loc[: size + 1],
            q_pos_start=self.q_pos_start[:size],
            kv_start=self.kv_start[:size],
            kv_lens=self.kv_lens[:size],
            block_tables=self.block_tables[: min(size, self.max_seqs)],
            slot_mapping=self.slot_mapping[:size],
            query_lens_cpu=[1] * size,  # the host lists are not read: the plan is fixed
            q_pos_start_cpu=[0] * size,
            kv_start_cpu=[0] * size,
            kv_lens_cpu=[0] * size,
            max_query_len=size,
            max_kv_len=self.max_blocks * self.block_size,
        )
        meta.backend_plan = plan = self.plans.plan_for(size, block_q, splits)
        plan.decode_confined = self.capture_stream is not None  # a lane split's few SMs
        return meta

    def _forward(self, key: tuple[int, int, int]) -> torch.Tensor:
        size = key[0]
        inp = (self.input_ids if self.model.is_first_stage else self.hidden)[:size]
        return self.model(inp, self.positions[:size], self.kv_caches, self.metas[key])

    def _capture(self, key: tuple[int, int, int]) -> None:
        self.metas[key] = self._meta(key)
        if not self.use_graphs:
            return
        graph, self.outputs[key] = capture_graph(lambda: self._forward(key), self.pool, self.capture_stream)
        self.pool = graph.pool()
        self.graphs[key] = graph

    def close(self) -> None:
        """Drop the graphs (before the process group is destroyed)."""
        if self.use_graphs:
            torch.cuda.synchronize()
        self.graphs.clear()
        self.outputs.clear()
        self.metas.clear()
