"""Turns a SchedulerOutput into tensors, runs the model, samples.

Packed batch layout for one step (chunks in scheduler order, decodes first)::

    input_ids / positions:  [ c0 tokens | c1 tokens | ... ]      # [num_tokens]
    logits rows:            prompt-logprob rows of each chunk, then its sample row

Each chunk's KV range on this device comes from its request's KV pieces (one
piece per request on a single device): it attends to keys [0, chunk.end) and
writes the K/V of positions [chunk.start, chunk.end).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mnemosyne.config import CacheConfig, ModelConfig
from mnemosyne.engine.scheduler_output import ScheduledChunk, SchedulerOutput
from mnemosyne.kv_cache.pieces import KVPiece
from mnemosyne.layers.attention.metadata import AttentionMetadata
from mnemosyne.layers.sampler import Sampler, compute_prompt_logprobs
from mnemosyne.models.llama import KVCache, LlamaForCausalLM
from mnemosyne.request import TokenLogprobs


@dataclass
class ModelRunnerOutput:
    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    # request_id -> (first prompt position p, entries for positions p+1, p+2, ...)
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprobs]]] = field(default_factory=dict)


def allocate_kv_caches(
    model_cfg: ModelConfig, num_blocks: int, block_size: int, device: torch.device | str
) -> list[KVCache]:
    shape = (num_blocks, block_size, model_cfg.num_kv_heads, model_cfg.head_dim)
    return [
        (
            torch.zeros(shape, dtype=model_cfg.dtype, device=device),
            torch.zeros(shape, dtype=model_cfg.dtype, device=device),
        )
        for _ in range(model_cfg.num_layers)
    ]


def prompt_logprob_positions(chunk: ScheduledChunk) -> range:
    """Prompt positions p in this chunk whose logits score prompt token p + 1."""
    req = chunk.request
    if req.sampling_params.prompt_logprobs is None:
        return range(0)
    lo = max(chunk.start, req.num_prompt_logprobs_done)
    hi = min(chunk.end, req.num_prompt_tokens - 1)
    return range(lo, max(lo, hi))


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        model_cfg: ModelConfig,
        cache_cfg: CacheConfig,
        device: torch.device | str,
    ) -> None:
        self.model = model
        self.model_cfg = model_cfg
        self.block_size = cache_cfg.block_size
        self.device = torch.device(device)
        self.kv_caches = allocate_kv_caches(
            model_cfg, cache_cfg.num_blocks_per_group[0], self.block_size, device
        )
        self.sampler = Sampler()

    def _build_metadata(
        self, chunks: list[ScheduledChunk], pieces: list[list[KVPiece]]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        block_tables: list[list[int]] = []
        for chunk, req_pieces in zip(chunks, pieces, strict=True):
            (piece,) = req_pieces  # a single device holds the whole request
            req = chunk.request
            token_ids.extend(req.token_id_at(p) for p in range(chunk.start, chunk.end))
            positions.extend(range(chunk.start, chunk.end))
            slots.extend(piece.slot(p, self.block_size) for p in range(chunk.start, chunk.end))
            block_tables.append(piece.block_ids)
        meta = AttentionMetadata.build(
            query_lens=[c.num_tokens for c in chunks],
            q_pos_start=[c.start for c in chunks],
            kv_start=[0] * len(chunks),
            kv_lens=[c.end for c in chunks],
            block_tables=block_tables,
            slot_mapping=slots,
            device=self.device,
        )
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        return ids, pos, meta

    @torch.inference_mode()
    def execute(
        self,
        sched: SchedulerOutput,
        pieces: list[list[KVPiece]],
        generators: dict[str, torch.Generator | None],
    ) -> ModelRunnerOutput:
        """Run one step. `pieces[i]` is the KV placement of `sched.chunks[i]`'s request."""
        out = ModelRunnerOutput()
        if sched.is_empty:
            return out
        ids, pos, meta = self._build_metadata(sched.chunks, pieces)
        hidden = self.model(ids, pos, self.kv_caches, meta)  # [num_tokens, hidden_size]

        # Rows whose logits are needed: prompt-logprob rows, then sample rows.
        plp_rows: list[int] = []
        plp_spans: list[tuple[ScheduledChunk, range, int]] = []  # (chunk, positions, first row)
        sample_rows: list[int] = []
        sample_chunks: list[ScheduledChunk] = []
        offset = 0
        for chunk in sched.chunks:
            positions = prompt_logprob_positions(chunk)
            if len(positions):
                plp_spans.append((chunk, positions, len(plp_rows)))
                plp_rows.extend(offset + p - chunk.start for p in positions)
            if chunk.sample:
                sample_rows.append(offset + chunk.num_tokens - 1)
                sample_chunks.append(chunk)
            offset += chunk.num_tokens
        if not plp_rows and not sample_rows:
            return out
        rows = torch.tensor(plp_rows + sample_rows, dtype=torch.long, device=self.device)
        logits = self.model.compute_logits(hidden[rows]).float()  # [num_rows, vocab_size]

        for chunk, positions, row_lo in plp_spans:
            req = chunk.request
            n = len(positions)
            targets = torch.tensor(
                req.prompt_token_ids[positions.start + 1 : positions.stop + 1],
                dtype=torch.long,
                device=self.device,
            )
            k = req.sampling_params.prompt_logprobs or 0
            entries = compute_prompt_logprobs(logits[row_lo : row_lo + n], targets, k)
            out.prompt_logprobs[req.request_id] = (positions.start, entries)

        if sample_chunks:
            params = [c.request.sampling_params for c in sample_chunks]
            gens = [generators.get(c.request.request_id) for c in sample_chunks]
            sampled = self.sampler(logits[len(plp_rows) :], params, gens)
            for chunk, tok, lp in zip(sample_chunks, sampled.token_ids, sampled.logprobs, strict=True):
                out.sampled_token_ids[chunk.request.request_id] = tok
                if lp is not None:
                    out.logprobs[chunk.request.request_id] = lp
        return out
