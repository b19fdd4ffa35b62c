"""Where a mixed step's device time goes, beside each part's floor: D decodes at K keys plus
one prefill chunk of c tokens after P keys, as the mixed scenario's steps hold them, run
through the worker's own path (the mixed-step graphs when the step fits them, else the
piecewise graphs) and its LM head over the sampled rows. One GPU, dummy weights.

    python -m benchmarks.probes.mixed_step_kernels --shape llama3-8b \
        --cases 32x2420+32:196608,32x2420+64:196608,32x1100+224:40960 --out DIR

Per case: the step's median wall time (synchronised), torch.profiler's device time per
kernel (mean per step), the kernels grouped by part, and the floors (the H200 peaks of
`mnemosyne.bench.long_context.engine`: COPY_BPS, MATMUL_FLOPS, ATTN_FLOPS)::

    dense     max(bytes read / COPY_BPS, (2 * layer params * tokens + 2 * V * h * sampled) / MATMUL_FLOPS)
              bytes read: every weight but the embedding table, of which a step reads only its
              rows (the tied LM head reads the matrix: counted); layer params: every parameter
              but the embedding and LM head; the LM head runs over the sampled rows only
    decode    decode KV bytes / COPY_BPS
    chunk     max(chunk KV bytes / COPY_BPS, 4 * c * (P + c/2) * D * H * L / ATTN_FLOPS)

Built to find where the eleventh session's 8B mixed steps spent their time against their
floors (benchmarks/results/README.md, "Twelfth session").
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from mnemosyne.bench.long_context.engine import ATTN_FLOPS, COPY_BPS, MATMUL_FLOPS, sequences_meta
from mnemosyne.bench.long_context.run import write_model_dir
from mnemosyne.config import ModelConfig
from mnemosyne.engine.args import EngineArgs
from mnemosyne.engine.llm_engine import LLMEngine
from mnemosyne.worker.worker import Worker

# Kernel-name fragments -> part; the first match wins, "other" for the rest.
PARTS = (
    ("merge", "chunk_attn"),
    ("_chunk_", "chunk_attn"),
    ("decode", "decode_attn"),
    ("split_kv", "decode_attn"),
    ("kv_cache", "kv_write"),
    ("write_kv", "kv_write"),
    ("gemm", "matmul"),
    ("nvjet", "matmul"),
    ("cutlass", "matmul"),
    ("xmma", "matmul"),
    ("rms", "norm_rope_act"),
    ("rotary", "norm_rope_act"),
    ("silu", "norm_rope_act"),
    ("copy", "copies"),
    ("fill", "copies"),
)


@dataclass(frozen=True)
class MixedCase:
    num_decodes: int
    decode_keys: int  # keys each decode reads, its own included
    chunk_tokens: int
    chunk_prefix: int

    @classmethod
    def parse(cls, text: str) -> MixedCase:
        """'DxK+c:P', e.g. '32x2420+64:196608'."""
        try:
            decodes, chunk = text.split("+")
            d, k = decodes.split("x")
            c, p = chunk.split(":")
            return cls(int(d), int(k), int(c), int(p))
        except ValueError as e:
            raise ValueError(f"case {text!r}: expected DxK+c:P (decodes x keys + chunk:prefix)") from e

    @property
    def sequences(self) -> list[tuple[int, int]]:
        """(query tokens, prefix keys) per sequence: the decodes, then the chunk."""
        return [(1, self.decode_keys - 1)] * self.num_decodes + [(self.chunk_tokens, self.chunk_prefix)]

    @property
    def name(self) -> str:
        return f"{self.num_decodes}x{self.decode_keys}+{self.chunk_tokens}:{self.chunk_prefix}"


def floors_ms(case: MixedCase, cfg: ModelConfig) -> dict[str, float]:
    """The parts' floors in ms (module docstring)."""
    table = cfg.vocab_size * cfg.hidden_size  # the embedding (and an untied LM head)
    heads = 1 if cfg.tie_word_embeddings else 2  # matrices of that size
    tokens, sampled = case.num_decodes + case.chunk_tokens, case.num_decodes + 1
    bytes_read = cfg.weight_bytes - (heads - 1) * table * cfg.dtype.itemsize
    dense_flops = 2 * (cfg.num_params - heads * table) * tokens + 2 * table * sampled
    c, p = case.chunk_tokens, case.chunk_prefix
    chunk_flops = 4 * c * (p + c / 2) * cfg.head_dim * cfg.num_heads * cfg.num_layers
    kv = cfg.kv_bytes_per_token
    out = {
        "dense": max(bytes_read / COPY_BPS, dense_flops / MATMUL_FLOPS),
        "decode_attn": case.num_decodes * case.decode_keys * kv / COPY_BPS,
        "chunk_attn": max((p + c) * kv / COPY_BPS, chunk_flops / ATTN_FLOPS),
    }
    return {k: v * 1e3 for k, v in out.items()} | {"total": sum(out.values()) * 1e3}


def part_of(kernel: str) -> str:
    low = kernel.lower()
    return next((part for frag, part in PARTS if frag in low), "other")


def measure_case(worker: Worker, case: MixedCase, block_size: int, iters: int) -> dict:
    """The step's median wall time and its kernels' device times (module docstring)."""
    meta = sequences_meta(case.sequences, block_size)
    positions = [j for n_q, prefix in case.sequences for j in range(prefix, prefix + n_q)]
    n = len(positions)
    ids = torch.ones(n, dtype=torch.long, device="cuda")
    pos = torch.tensor(positions, dtype=torch.long, device="cuda")
    sampled = torch.tensor([*range(case.num_decodes), n - 1], device="cuda")  # decodes + the chunk's last row
    paths: list[str] = []

    def step() -> None:
        meta.backend_plan = None
        hidden = worker.mixed.try_run(ids, pos, meta) if worker.mixed is not None else None
        paths.append("piecewise" if hidden is None else "mixed_graph")
        if hidden is None:
            hidden = worker.piecewise.run(ids, pos, worker.kv_caches, meta)
        worker.model.compute_logits(hidden[sampled])

    walls = []
    for i in range(iters + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        if i:  # the first run is a warm-up
            walls.append(time.perf_counter() - t0)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    kernels = sorted(
        ({"name": e.key, "calls_per_step": e.count / 3, "device_ms": e.self_device_time_total / 3e3}
         for e in prof.key_averages() if e.self_device_time_total > 0),
        key=lambda k: -k["device_ms"],
    )  # fmt: skip
    parts: dict[str, float] = {}
    for k in kernels:
        parts[part_of(k["name"])] = parts.get(part_of(k["name"]), 0.0) + k["device_ms"]
    return {"case": case.name, "path": paths[-1], "wall_ms": statistics.median(walls) * 1e3,
            "device_ms": sum(parts.values()), "parts_ms": parts, "kernels": kernels[:40]}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--cases", default="32x2420+32:196608,32x2420+64:196608,32x1100+224:40960")
    p.add_argument("--kv-fraction", type=float, default=0.5)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--out", type=Path, required=True)
    ns = p.parse_args()
    cases = [MixedCase.parse(c) for c in ns.cases.split(",")]
    model_dir = write_model_dir(ns.shape, Path(tempfile.mkdtemp()), 1 << 20)
    args = EngineArgs(model=str(model_dir), load_format="dummy", dtype="bfloat16", chunk_size=2048,
                      max_num_batched_tokens=2048, max_num_seqs=64, kv_cache_memory_fraction=ns.kv_fraction)  # fmt: skip
    engine = LLMEngine.from_args(args)
    worker = engine.executor.worker
    cfg = engine.config.model
    ns.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in cases:
        row = measure_case(worker, case, engine.config.cache.block_size, ns.iters)
        row["floors_ms"] = floors_ms(case, cfg)
        print(json.dumps({k: v for k, v in row.items() if k != "kernels"}), flush=True)
        rows.append(row)
    info = {"shape": ns.shape, "device": torch.cuda.get_device_name(), "num_params": cfg.num_params,
            "weight_bytes": cfg.weight_bytes, "torch": torch.__version__}  # fmt: skip
    (ns.out / f"mixed_step_kernels_{ns.shape}.json").write_text(json.dumps(info | {"rows": rows}, indent=1))
    engine.shutdown()


if __name__ == "__main__":
    main()
