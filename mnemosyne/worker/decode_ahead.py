"""Decode-ahead input ids (async scheduling): the previous plan's samples, on every rank.

With async scheduling plan n+1 may hold a *decode ahead* for a request whose sampling
chunk is in plan n (`wire/plan.py` UNRESOLVED_TOKEN_ID): its input id is what plan n
samples, still on the device of the reporting rank (last stage, tp rank 0) of the KVP
group that owned the request's chunk in plan n. Every rank of every group whose
sub-batch holds the decode ahead needs that id (all TP ranks: the embedding is
vocab-parallel), and with KVP the owner can change between the two plans (the decode
ahead is the first token of a new group's piece), so no single rank can put it in place.
One all-reduce over the world, per plan that has decode aheads, gives it to everyone::

    plan n     group g owns [T-1, T) of request r; g's reporting rank samples tok@T
               (kept on its device: PendingResult.tokens)
    plan n+1   decode aheads a_0 .. a_{m-1} in plan order (the same list on every rank)
      every rank      v = zeros[m + 1] int64
      reporting rank  v[i] = tok of a_i, for each a_i that it sampled in plan n;
                      v[m] = how many it wrote
      every rank      all_reduce(v, sum, world)   each v[i] has exactly one source, v[m] == m
      group h         input_ids[row of a_i in h's sub-batch] = v[i]     (on the device)

Every rank joins, idle groups too, at the same point of every plan that has decode
aheads (before the forward), so the world's collectives stay in the same order on every
rank. On CUDA nothing waits on the host; on CPU (gloo, synchronous) v[m] is checked.
One device has a world of size 1: no collective, v = the previous samples gathered.

Only for spp == 1 (`EngineArgs` turns async scheduling off with a pipeline): with
stages, stage 0 would wait in this collective for the last stage to finish plan n,
which would drain the pipeline the in-flight micro-batches keep full.

The reporting ranks' token histories (penalties, min_tokens) see decode-ahead inputs
from `host_token`: a pinned host copy of v, started right after the all-reduce when a
history needs it, so reading it waits for the collective, not for the plan's forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mnemosyne.layers.attention.metadata import to_device_packed
from mnemosyne.parallel.comm import all_reduce
from mnemosyne.parallel.groups import GroupHandle
from mnemosyne.wire.plan import ChunkPlan, StepPlan
from mnemosyne.worker.pending_result import PendingResult
from mnemosyne.worker.sub_batch import SubBatch


@dataclass
class DecodeAheadTokens:
    chunks: list[ChunkPlan]  # the plan's decode aheads, in plan order
    index: dict[str, int]  # request id -> its entry of `tokens`
    tokens: torch.Tensor  # [num_decode_aheads] int64 on the device
    host_tokens: torch.Tensor | None  # [num_decode_aheads], pinned on CUDA; valid once `done` fired
    done: torch.cuda.Event | None

    @classmethod
    def exchange(
        cls,
        plan: StepPlan,
        previous: PendingResult | None,
        world: GroupHandle,
        device: torch.device,
        copy_to_host: bool,
    ) -> DecodeAheadTokens | None:
        """The plan's decode-ahead input ids on this rank's device (collective over `world`
        when it has more than one rank); None when the plan has no decode ahead."""
        chunks = [c for c in plan.chunks if c.is_decode_ahead]
        if not chunks:
            return None
        index = {c.request_id: i for i, c in enumerate(chunks)}
        dst: list[int] = []  # entries this rank sampled ...
        src: list[int] = []  # ... and their rows of previous.tokens
        if previous is not None:
            for i, c in enumerate(chunks):
                row = previous.rows.get(c.request_id)
                if row is not None:
                    dst.append(i)
                    src.append(row)
        m = len(chunks)
        if world.size == 1:
            if len(src) != m:
                missing = [c.request_id for c in chunks if previous is None or c.request_id not in previous.rows]
                raise RuntimeError(f"decode aheads of {missing}: the previous plan sampled no token for them")
            (src_d,) = to_device_packed((src,), torch.long, device)
            tokens = previous.tokens[src_d]  # type: ignore[union-attr]  # [m]
        else:
            v = torch.zeros(m + 1, dtype=torch.long, device=device)  # [m tokens, number of sources]
            if src:
                dst_d, src_d = to_device_packed((dst, src), torch.long, device)
                v[dst_d] = previous.tokens[src_d]  # type: ignore[union-attr]
                v[m] = len(src)
            all_reduce(v, world)
            if device.type == "cpu" and int(v[m]) != m:  # gloo has finished: a free check
                raise RuntimeError(f"decode-ahead inputs: {int(v[m])} sources for {m} tokens (want one each)")
            tokens = v[:m]
        if not copy_to_host:
            return cls(chunks, index, tokens, None, None)
        if device.type != "cuda":
            return cls(chunks, index, tokens, tokens, None)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return cls(chunks, index, tokens, host, done)

    def fill(self, batch: SubBatch) -> None:
        """input_ids[row] = the token of the row's decode ahead, for each in `batch` (device)."""
        if not batch.decode_ahead_rows:
            return
        entries = [self.index[batch.chunks[i].request_id] for i in batch.decode_ahead_chunks]
        device = batch.input_ids.device
        if entries == list(range(len(self.chunks))):  # every decode ahead, in order (one device)
            (rows_d,) = to_device_packed((batch.decode_ahead_rows,), torch.long, device)
            batch.input_ids[rows_d] = self.tokens
            return
        rows_d, entries_d = to_device_packed((batch.decode_ahead_rows, entries), torch.long, device)
        batch.input_ids[rows_d] = self.tokens[entries_d]

    def host_token(self, request_id: str) -> int:
        """The input id of `request_id`'s decode ahead (waits for the exchange only)."""
        if self.host_tokens is None:
            raise RuntimeError("decode-ahead inputs were not copied to the host (no history needed them)")
        if self.done is not None:
            self.done.synchronize()
        return int(self.host_tokens[self.index[request_id]])
