"""Decode tuning probe: split-kernel tunables sweep, and where an 8B decode step spends its time.

python -m benchmarks.probes.decode_tuning OUT.json
"""

from __future__ import annotations

import functools
import itertools
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

from mnemosyne.bench.long_context.kernels import BLOCK, _cache, _tables, time_ms
from mnemosyne.kernels.decode_attention import choose_num_splits, paged_decode_attention
from mnemosyne.layers.attention.metadata import AttentionMetadata


def sweep() -> list[dict]:
    res = []
    h, hkv, d = 32, 8, 128
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for num_seqs, ctx in ((1, 1 << 15), (1, 1 << 17), (1, 1 << 20), (8, 1 << 17)):
        k_cache, v_cache = _cache(num_seqs * ctx, hkv, d, torch.bfloat16)
        meta = AttentionMetadata.build(
            [1] * num_seqs,
            [ctx - 1] * num_seqs,
            [0] * num_seqs,
            [ctx] * num_seqs,
            _tables(num_seqs, -(-ctx // BLOCK), False),
            [-1] * num_seqs,
            "cuda",
        )
        q = torch.randn(num_seqs, h, d, device="cuda", dtype=torch.bfloat16)
        out, lse = torch.empty_like(q), torch.empty(num_seqs, h, device="cuda")
        ids = torch.arange(num_seqs, device="cuda", dtype=torch.int32)
        args = (meta.query_start_loc, meta.q_pos_start, meta.kv_start, meta.kv_lens, meta.block_tables, ids)
        nbytes = 2 * num_seqs * ctx * hkv * d * 2
        for bn, waves, stages, warps in itertools.product((64, 128), (1, 2, 4, 8), (2, 3, 4), (4, 8)):
            splits = choose_num_splits(num_seqs, hkv, 1 << 21, sms, block_n=bn, waves=waves)
            try:
                fn = functools.partial(
                    paged_decode_attention, q, k_cache, v_cache, *args, out, lse, d**-0.5, None, splits,
                    block_n=bn, num_warps=warps, num_stages=stages,
                )  # fmt: skip
                ms = time_ms(fn, 20)
            except Exception as e:  # noqa: BLE001
                res.append({"ctx": ctx, "bn": bn, "error": str(e)[:100]})
                continue
            res.append(
                {
                    "num_seqs": num_seqs,
                    "ctx": ctx,
                    "block_n": bn,
                    "waves": waves,
                    "stages": stages,
                    "warps": warps,
                    "splits": splits,
                    "us": ms * 1e3,
                    "tbps": nbytes / ms / 1e9,
                }
            )
        best = min(
            (r for r in res if r.get("ctx") == ctx and r.get("num_seqs") == num_seqs and "us" in r),
            key=lambda r: r["us"],
        )
        print("best", best, flush=True)
        torch.cuda.empty_cache()
    return res


@torch.inference_mode()
def profile_step() -> dict:
    from mnemosyne.bench.long_context.engine import synthetic_meta
    from mnemosyne.bench.long_context.run import write_model_dir
    from mnemosyne.engine.args import EngineArgs
    from mnemosyne.engine.llm_engine import LLMEngine

    with tempfile.TemporaryDirectory() as tmp:
        d = write_model_dir("llama3-8b", Path(tmp))
        eng = LLMEngine.from_args(
            EngineArgs(
                model=str(d), load_format="dummy", dtype="bfloat16", kv_cache_memory_gb=20, max_num_seqs=8
            )
        )
    w = eng.executor.worker
    m = w.model
    ctx = 1 << 15
    meta = synthetic_meta(1, ctx, 16)
    ids, pos = torch.ones(1, dtype=torch.long, device="cuda"), torch.tensor([ctx], device="cuda")
    for _ in range(3):
        m.compute_logits(m(ids, pos, w.kv_caches, meta)).argmax()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            m.compute_logits(m(ids, pos, w.kv_caches, meta)).argmax()
        torch.cuda.synchronize()
    agg: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            agg[ev.name[:90]] += ev.device_time_total / 5
    top = dict(sorted(agg.items(), key=lambda kv: -kv[1])[:25])
    total = sum(agg.values())
    hid = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    wt = torch.randn(128256, 4096, device="cuda", dtype=torch.bfloat16)
    lm = {
        "bf16_mm_us": time_ms(lambda: torch.mm(hid, wt.t()), 20) * 1e3,
        "fp32_out_mm_us": time_ms(lambda: torch.mm(hid, wt.t(), out_dtype=torch.float32), 20) * 1e3,
        "floor_us": wt.numel() * 2 / 4.2e12 * 1e6,
    }
    print("total kernel us per step", total, "lm", lm, flush=True)
    for k, v in top.items():
        print(f"{v:9.1f} us  {k}", flush=True)
    return {"kernel_us_per_step": total, "top": top, "lm_head": lm}


if __name__ == "__main__":
    out = {"profile": profile_step(), "sweep": sweep()}
    Path(sys.argv[1]).write_text(json.dumps(out, indent=1))
