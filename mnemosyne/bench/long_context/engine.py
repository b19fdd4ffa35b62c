"""Mnemosyne on one GPU with a random-weight model of a real shape: TTFT and TBT vs context.

Measured three ways, all on the same engine (load_format=dummy, bf16, the kernel backend):

  end to end   requests through LLMEngine.step (scheduler, plans, kernels, sampling, detok),
               at the contexts given by --e2e (a real prefill of the whole prompt)
  decode step  one decode at position L through the worker's CUDA graph + LM head + argmax,
               over a KV of L keys (a synthetic block table; decode cost does not depend
               on the cached values), for every context up to min(cache capacity,
               max_model_len): the graph's static block table has ceil(max_model_len /
               block_size) columns (`DecodeGraphs`), so run.py declares positions past any
               one-GPU capacity (LONG_MAX_POSITIONS; `decode_contexts` clamps anyway)
  chunk step   one prefill chunk of c tokens after a prefix of P keys (eager, cuDNN path)

TTFT at contexts beyond --e2e is the sum of the chunk steps of the whole prompt, with
t(P) interpolated linearly between the measured prefixes (attention grows linearly in P
for a fixed chunk; the end-to-end runs check the estimate). Floors:

  decode step  (weight bytes + KV bytes of L tokens) / 4.2 TB/s
  chunk step   2 * (params - embedding) * c / 800 TFLOP/s + 4 H D layers (c P + c(c+1)/2) / 590 TFLOP/s
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from mnemosyne import SamplingParams
from mnemosyne.config import ModelConfig
from mnemosyne.engine.args import EngineArgs
from mnemosyne.engine.llm_engine import LLMEngine
from mnemosyne.layers.attention.metadata import AttentionMetadata

COPY_BPS = 4.2e12
MATMUL_FLOPS = 800e12
ATTN_FLOPS = 590e12


def decode_floor_s(cfg: ModelConfig, ctx: int) -> float:
    return (cfg.weight_bytes + ctx * cfg.kv_bytes_per_token) / COPY_BPS


# The mixed step of the kernel issue's targets (8B shape): decodes, the keys each reads, one
# prefill chunk's tokens, and the keys before it.
MIXED_STEP = (32, 1024, 128, 1 << 18)


def mixed_floor_s(cfg: ModelConfig, num_decodes: int, ctx: int, chunk: int, prefix: int) -> tuple[float, float]:
    """(FLOPs floor, bytes floor) of a step of num_decodes decodes at ctx keys each (0: none)
    plus one chunk of `chunk` tokens after `prefix` keys: linear FLOPs at MATMUL_FLOPS and
    attention FLOPs at ATTN_FLOPS; the weights and every key read once at COPY_BPS."""
    tokens = num_decodes + chunk
    linear = 2 * (cfg.num_params - cfg.vocab_size * cfg.hidden_size) * tokens
    attn = 4 * cfg.num_heads * cfg.head_dim * cfg.num_layers * (
        num_decodes * ctx + chunk * prefix + chunk * (chunk + 1) / 2
    )
    flop_s = linear / MATMUL_FLOPS + attn / ATTN_FLOPS
    byte_s = (cfg.weight_bytes + (num_decodes * ctx + prefix + chunk) * cfg.kv_bytes_per_token) / COPY_BPS
    return flop_s, byte_s


def chunk_floor_s(cfg: ModelConfig, chunk: int, prefix: int) -> float:
    return mixed_floor_s(cfg, 0, 0, chunk, prefix)[0]


def chunk_bytes_floor_s(cfg: ModelConfig, chunk: int, prefix: int) -> float:
    return mixed_floor_s(cfg, 0, 0, chunk, prefix)[1]


def ttft_floor_s(cfg: ModelConfig, ctx: int, chunk: int) -> float:
    return sum(chunk_floor_s(cfg, min(chunk, ctx - p), p) for p in range(0, ctx, chunk))


def random_prompt(n: int, seed: int = 0, max_id: int = 128000) -> list[int]:
    return torch.randint(0, max_id, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def decode_contexts(capacity: int, max_model_len: int, chunk: int, block_size: int) -> list[int]:
    """Contexts L of the decode sweep: powers of two from 32K to 2M, 768K, 3M, and the largest
    one that both the KV cache (a chunk and a block spare) and max_model_len (the decode's
    query at position L is token L + 1) allow."""
    top = min(capacity - chunk - block_size, max_model_len - 1)
    powers = [1 << k for k in range(15, 22)]
    return sorted({c for c in (*powers, 786432, 3 << 20, top) if 0 < c <= top})


def synthetic_meta(query_len: int, prefix: int, block_size: int, device: str = "cuda") -> AttentionMetadata:
    """One sequence: query_len queries after `prefix` keys, blocks 0, 1, 2, ... (one run)."""
    return sequences_meta([(query_len, prefix)], block_size, device)


def sequences_meta(
    sequences: list[tuple[int, int]], block_size: int, device: str = "cuda"
) -> AttentionMetadata:
    """Each (query_len, prefix) sequence on its own run of consecutive blocks, the first from
    block 0 and each next one after the last, as the engine lays out a request's KV::

        seq 0: blocks [0, n_0)   seq 1: blocks [n_0, n_0 + n_1)   ...   n_i = ceil((prefix_i + query_len_i) / B)
    """
    tables, slots, b0 = [], [], 0
    for query_len, prefix in sequences:
        total = prefix + query_len
        tables.append(list(range(b0, b0 + -(-total // block_size))))
        slots.extend(b0 * block_size + j for j in range(prefix, total))  # the run makes slot = b0 * B + j
        b0 += len(tables[-1])
    return AttentionMetadata.build(
        query_lens=[q for q, _ in sequences],
        q_pos_start=[p for _, p in sequences],
        kv_start=[0] * len(sequences),
        kv_lens=[q + p for q, p in sequences],
        block_tables=tables,
        slot_mapping=slots,
        device=device,
        block_runs=[(t[0], len(t)) for t in tables],
    )


def check_graph_fits(graphs, meta: AttentionMetadata) -> None:  # graphs: DecodeGraphs
    """Raise a clear error when the worker's decode graphs cannot take this decode (its block
    table is wider than the graphs' static one, sized by max_model_len)."""
    if not graphs.can_run(meta):
        raise ValueError(
            f"a decode over {meta.max_kv_len} keys ({meta.block_tables.shape[1]} blocks) does not fit "
            f"the CUDA graphs' block table of {graphs.max_blocks} blocks (max_model_len / block_size): "
            "raise max_model_len"
        )


def run_to_completion(engine, prompt: list[int], params):  # -> RequestOutput
    """Add one request to an idle engine and step until it finishes; its final output."""
    rid = engine.add_request(prompt, params)
    out = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.request_id == rid:
                out = o
    assert out is not None and out.finished
    return out


def _median_s(fn, iters: int) -> float:
    fn()
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@torch.inference_mode()
def run(model_dir: Path, chunk: int, e2e: list[int], num_decode: int, kv_fraction: float) -> dict:
    args = EngineArgs(
        model=str(model_dir), load_format="dummy", dtype="bfloat16", chunk_size=chunk,
        max_num_batched_tokens=chunk, max_num_seqs=8, kv_cache_memory_fraction=kv_fraction,
    )  # fmt: skip
    engine = LLMEngine.from_args(args)
    cfg, cache = engine.config.model, engine.config.cache
    capacity = cache.num_blocks_per_group[0] * cache.block_size
    res: dict = {"kv_capacity_tokens": capacity, "max_model_len": engine.config.scheduler.max_model_len}
    res["weight_bytes"], res["kv_bytes_per_token"] = cfg.weight_bytes, cfg.kv_bytes_per_token
    print("capacity", capacity, flush=True)

    # ---- warm-up (not measured): Triton JIT, cuDNN plans, the batch-1 decode graph, as a
    # server does before taking traffic ----------------------------------------------------
    engine.add_request(
        random_prompt(3000, seed=1), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    )
    while engine.has_unfinished_requests():
        engine.step()

    # ---- end to end through the engine --------------------------------------------------
    res["e2e"] = []
    for ctx in e2e:
        params = SamplingParams(temperature=0, max_tokens=num_decode + 1, ignore_eos=True)
        out = run_to_completion(engine, random_prompt(ctx), params)
        gaps = [b - a for a, b in zip(out.timing.token_times, out.timing.token_times[1:], strict=False)]
        entry = {
            "ctx": ctx, "ttft_s": out.timing.ttft, "tbt_median_s": statistics.median(gaps),
            "ttft_floor_s": ttft_floor_s(cfg, ctx, chunk), "tbt_floor_s": decode_floor_s(cfg, ctx),
            "first_tokens": out.token_ids[:8],
        }  # fmt: skip
        print(entry, flush=True)
        res["e2e"].append(entry)

    # ---- worker level: decode steps and chunk steps over synthetic block tables --------
    worker = engine.executor.worker
    model, bs = worker.model, cache.block_size
    ids1 = torch.ones(1, dtype=torch.long, device="cuda")
    max_model_len = engine.config.scheduler.max_model_len
    ctxs = decode_contexts(capacity, max_model_len, chunk, bs)
    top = ctxs[-1]
    res["decode"] = []
    for ctx in ctxs:
        meta = synthetic_meta(1, ctx, bs)
        check_graph_fits(worker.graphs, meta)
        pos = torch.tensor([ctx], device="cuda")

        def graph_step(pos: torch.Tensor = pos, meta: AttentionMetadata = meta) -> int:
            return int(model.compute_logits(worker.graphs.run(ids1, pos, meta)).argmax(-1)[0])

        def eager_step(pos: torch.Tensor = pos, meta: AttentionMetadata = meta) -> int:
            return int(model.compute_logits(model(ids1, pos, worker.kv_caches, meta)).argmax(-1)[0])

        entry = {"ctx": ctx, "graph_s": _median_s(graph_step, 20), "floor_s": decode_floor_s(cfg, ctx)}
        if ctx in (1 << 15, 1 << 17):
            entry["eager_s"] = _median_s(eager_step, 10)
        entry["ratio_to_floor"] = entry["graph_s"] / entry["floor_s"]
        print(entry, flush=True)
        res["decode"].append(entry)

    res["chunks"] = []
    ids = torch.ones(chunk, dtype=torch.long, device="cuda")
    prefixes = sorted(
        {p for p in (0, 1 << 15, 1 << 17, 1 << 18, 1 << 19, 786432, top - chunk) if 0 <= p <= top - chunk}
    )
    for prefix in prefixes:
        meta = synthetic_meta(chunk, prefix, bs)
        pos = torch.arange(prefix, prefix + chunk, device="cuda")

        def chunk_step(pos: torch.Tensor = pos, meta: AttentionMetadata = meta) -> int:
            hidden = model(ids, pos, worker.kv_caches, meta)
            return int(model.compute_logits(hidden[-1:]).argmax(-1)[0])

        t = _median_s(chunk_step, 2)
        floor = chunk_floor_s(cfg, chunk, prefix)
        entry = {"prefix": prefix, "chunk": chunk, "s": t, "floor_s": floor, "ratio_to_floor": t / floor,
                 "tokens_per_s": chunk / t, "floor_tokens_per_s": chunk / floor}  # fmt: skip
        print(entry, flush=True)
        res["chunks"].append(entry)

    # ---- TTFT estimate from the chunk steps --------------------------------------------
    pts = [(c["prefix"], c["s"]) for c in res["chunks"]]

    def t_at(p: int) -> float:
        for (p0, t0), (p1, t1) in zip(pts, pts[1:], strict=False):
            if p <= p1:
                return t0 + (t1 - t0) * (p - p0) / (p1 - p0)
        (p0, t0), (p1, t1) = pts[-2], pts[-1]
        return t1 + (t1 - t0) * (p - p1) / (p1 - p0)

    res["ttft_estimate"] = [
        {
            "ctx": ctx,
            "ttft_s": sum(t_at(p) for p in range(0, ctx, chunk)),
            "floor_s": ttft_floor_s(cfg, ctx, chunk),
        }
        for ctx in sorted({*ctxs, *e2e})
    ]
    engine.shutdown()
    return res
