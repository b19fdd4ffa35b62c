"""Exactness over the layout space: random draws of (model, TP x SPP x KVP, chunking, KV
budget, prompts), each compared with Hugging Face transformers.

A draw (`Draw`) fixes everything one engine run needs. `draw_layouts(seed, n)` draws n of
them; `check_draw` runs one through `LLM` and compares it with HF:

    greedy tokens                      identical to HF generate
    prompt logprobs (every position)   within 1e-4 of HF's log-softmax
    sampled-token logprobs             within 1e-4
    KV manager                         check_integrity() after every step

What a draw spans, with B = block_size and T = max_tokens_per_kvp_group (a multiple of B):

    tp in {1, 2}, spp in {1, 2, 3}, kvp in {1, 2, 3, 4}, tp * spp * kvp <= max_world
    chunk_size 1..64, max_num_batched_tokens >= chunk_size, pipeline_depth spp or spp + 1
    T so that the longest request spans 1..kvp groups; group edges are block edges, so the
    prompts are drawn around them: a prompt ending one token before, at and after g*T, and
    mid-block, so prefill chunks and the first decodes land on every side of an edge
    KV blocks per group: ample, or tight enough to force preemption by recompute
    models: GQA, MQA (1 KV head, replicated over TP), qkv bias, q/k norm, a tied LM head
    (on another stage when spp > 1), head_dim 80, a sliding window

`python tests/layout_sweep.py --draws 300 --out summary.json` is the long mode (hundreds of
draws; the summary is committed under benchmarks/results/); tests/test_layout_sweep.py
runs a fixed, seeded set in CI.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

# Without a GPU the Triton kernels run in Triton's interpreter (set before any kernel is imported,
# as tests/conftest.py does; worker processes inherit it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import COMMON, build_tiny_model, load_hf  # noqa: E402

from mnemosyne import LLM, SamplingParams  # noqa: E402
from mnemosyne.config import ModelConfig, ParallelConfig  # noqa: E402
from mnemosyne.engine.args import kv_bytes_per_token_per_device  # noqa: E402

NUM_NEW = 12
ATOL = 1e-4
# The architectures a draw picks from, by what they make each layout shard or merge.
SWEEP_MODELS = (
    "llama",  # GQA 4:2
    "llama3_scaled",  # MQA: 1 KV head, replicated over TP; llama3 rope
    "qwen2",  # qkv bias
    "qwen3",  # q/k RMSNorm, head_dim 32
    "llama_linear_tied",  # tied LM head (a copy on the last stage when spp > 1)
    "llama_hd80",  # head_dim 80
    "mistral_sliding",  # sliding window 8, across KVP edges
)
NUM_LAYERS = COMMON["num_hidden_layers"]


@dataclass(frozen=True)
class Draw:
    model: str
    tp: int
    spp: int
    kvp: int
    pipeline_depth: int | None
    block_size: int
    chunk_size: int
    max_num_batched_tokens: int
    max_tokens_per_kvp_group: int | None
    num_blocks_per_group: int
    prompt_lens: tuple[int, ...]
    attention_backend: str = "reference"

    @property
    def world(self) -> int:
        return self.tp * self.spp * self.kvp

    def label(self) -> str:
        t = f" T={self.max_tokens_per_kvp_group}" if self.max_tokens_per_kvp_group else ""
        return (
            f"{self.model} tp{self.tp} spp{self.spp} kvp{self.kvp}{t} chunk={self.chunk_size} "
            f"budget={self.max_num_batched_tokens} B={self.block_size} blocks={self.num_blocks_per_group} "
            f"prompts={list(self.prompt_lens)} {self.attention_backend}"
        )


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def draw_one(rng: random.Random, max_world: int = 8, max_prompt_len: int = 301) -> Draw:
    """One random draw. Layouts of 8 processes are drawn less often than smaller ones."""
    while True:
        tp, spp, kvp = rng.choice((1, 2)), rng.choice((1, 2, 3)), rng.choice((1, 2, 3, 4))
        world = tp * spp * kvp
        if world <= max_world and (world < 8 or rng.random() < 0.4):
            break
    block = rng.choice((4, 8, 16))
    chunk = rng.choice((1, 2, 3, 5, 7, 8, 13, 16, 31, 32, 47, 64))
    budget = rng.choice((chunk, chunk + 3, 2 * chunk + 1, 64, 128))
    budget = max(budget, chunk)
    longest = rng.randint(max(2, max_prompt_len // 2), max_prompt_len)
    total = longest + NUM_NEW  # the longest request's final length (KV of total - 1 is written)

    t = None
    edge = total
    if kvp > 1:
        spans = rng.randint(2, kvp) if rng.random() < 0.85 else 1  # groups the longest one spans
        t = _round_up(-(-total // spans), block)
        edge = t
    # Prompts: short ones, the longest, and some ending right around a group edge (or,
    # with one group, a block edge) and mid-block.
    lens = {1, rng.randint(2, 20), longest}
    for delta in rng.sample((-1, 0, 1, block // 2), 2):
        if 1 <= edge + delta <= longest:
            lens.add(edge + delta)
    prompt_lens = tuple(sorted(lens, reverse=rng.random() < 0.5))

    # Blocks per group: each group must hold one whole piece of the longest request
    # (T tokens, or all of it with one group); "tight" adds little, so requests preempt.
    need = -(-(t if t is not None else total) // block)
    extra = rng.choice((0, 1, 2)) if rng.random() < 0.4 else 4 * need
    return Draw(
        model=rng.choice(SWEEP_MODELS),
        tp=tp,
        spp=spp,
        kvp=kvp,
        pipeline_depth=rng.choice((spp, spp + 1)) if spp > 1 else None,
        block_size=block,
        chunk_size=chunk,
        max_num_batched_tokens=budget,
        max_tokens_per_kvp_group=t,
        num_blocks_per_group=need + extra,
        prompt_lens=prompt_lens,
    )


def draw_layouts(seed: int, n: int, max_world: int = 8, max_prompt_len: int = 301) -> list[Draw]:
    rng = random.Random(seed)
    return [draw_one(rng, max_world, max_prompt_len) for _ in range(n)]


def make_prompts(lens: tuple[int, ...], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, COMMON["vocab_size"], (n,), generator=g).tolist() for n in lens]


class HFReference:
    """HF greedy continuations and log-softmax rows, cached per (model, prompt)."""

    def __init__(self, model_dir_of) -> None:
        self._model_dir_of = model_dir_of
        self._models: dict[str, torch.nn.Module] = {}
        self._cache: dict[tuple[str, tuple[int, ...]], tuple[list[int], torch.Tensor]] = {}

    def get(self, model: str, prompt: list[int]) -> tuple[list[int], torch.Tensor]:
        key = (model, tuple(prompt))
        if key not in self._cache:
            if model not in self._models:
                self._models[model] = load_hf(self._model_dir_of(model))
            hf = self._models[model]
            ids = torch.tensor([prompt])
            with torch.no_grad():
                gen = hf.generate(
                    ids, max_new_tokens=NUM_NEW, do_sample=False, eos_token_id=None, pad_token_id=0
                )
                logp = torch.log_softmax(hf(gen).logits[0].double(), dim=-1)  # [seq, vocab]
            self._cache[key] = (gen[0, len(prompt) :].tolist(), logp)
        return self._cache[key]


@dataclass
class DrawResult:
    draw: Draw
    seconds: float
    num_preemptions: int
    max_groups_spanned: int  # most KVP groups one request's KV spanned
    num_idle_group_steps: int  # (plan, group) pairs where the group idled while others merged


def kv_cache_gb(model_dir: Path, draw: Draw) -> float:
    """The per-device KV budget that gives `draw.num_blocks_per_group` blocks."""
    cfg = ModelConfig.from_pretrained(model_dir, torch.float32)
    parallel = ParallelConfig(tp=draw.tp, spp=draw.spp, kvp=draw.kvp)
    per_block = draw.block_size * kv_bytes_per_token_per_device(cfg, parallel)
    return (draw.num_blocks_per_group + 0.5) * per_block / 2**30


def check_draw(draw: Draw, model_dir: Path, ref: HFReference, device: str = "cpu") -> DrawResult:
    """Run `draw` and assert it matches HF (AssertionError names the draw and what differs)."""
    prompts = make_prompts(draw.prompt_lens)
    params = SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True, logprobs=1, prompt_logprobs=1)
    start = time.monotonic()
    with LLM(
        model=str(model_dir),
        dtype="float32",
        device=device,
        tp=draw.tp,
        spp=draw.spp,
        kvp=draw.kvp,
        pipeline_depth=draw.pipeline_depth,
        block_size=draw.block_size,
        chunk_size=draw.chunk_size,
        max_num_batched_tokens=draw.max_num_batched_tokens,
        max_tokens_per_kvp_group=draw.max_tokens_per_kvp_group,
        kv_cache_memory_gb=kv_cache_gb(model_dir, draw),
        attention_backend=draw.attention_backend,
        worker_timeout_s=120,
    ) as llm:
        engine = llm.engine
        assert engine.config.cache.num_blocks_per_group == (draw.num_blocks_per_group,) * draw.kvp
        idle = 0
        submit = engine.executor.submit

        def watching_submit(plan) -> None:
            nonlocal idle
            if plan.num_shared_tokens:
                busy = {p.group for c in plan.chunks for p in c.pieces}
                idle += draw.kvp - len(busy)
            submit(plan)

        engine.executor.submit = watching_submit
        ids = [engine.add_request(p, params) for p in prompts]
        done, max_groups = {}, 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out
            for rid in ids:
                max_groups = max(max_groups, len(engine.kv_manager.pieces(rid)))
            engine.kv_manager.check_integrity()
        num_preemptions = engine.scheduler.num_preemptions
    outs = [done[i] for i in ids]
    what = draw.label()
    for prompt, out in zip(prompts, outs, strict=True):
        ref_new, ref_logp = ref.get(draw.model, prompt)
        assert out.token_ids == ref_new, f"{what}: greedy tokens differ from HF (prompt of {len(prompt)})"
        for pos in range(1, len(prompt)):
            got, want = out.prompt_logprobs[pos][prompt[pos]], ref_logp[pos - 1, prompt[pos]].item()
            assert abs(got - want) < ATOL, (
                f"{what}: prompt logprob at {pos} of {len(prompt)}: {got} vs {want}"
            )
        for i, (tok, entry) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
            want = ref_logp[len(prompt) + i - 1, tok].item()
            assert abs(entry[tok] - want) < ATOL, f"{what}: logprob of sampled token {i}"
    return DrawResult(draw, time.monotonic() - start, num_preemptions, max_groups, idle)


def main() -> None:
    import tempfile

    ap = argparse.ArgumentParser(description="Long exactness sweep over random layouts (vs HF).")
    ap.add_argument("--draws", type=int, default=300)
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--max-world", type=int, default=8, help="most processes per draw (GPUs on cuda)")
    ap.add_argument("--max-prompt-len", type=int, default=301)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--attention-backend", default="reference", choices=("reference", "kernels"))
    ap.add_argument("--out", type=Path, required=True)
    ns = ap.parse_args()
    draws = [
        dataclasses.replace(d, attention_backend=ns.attention_backend)
        for d in draw_layouts(ns.seed, ns.draws, ns.max_world, ns.max_prompt_len)
    ]
    root = Path(tempfile.mkdtemp(prefix="sweep_models_"))
    dirs = {name: build_tiny_model(name, root) for name in SWEEP_MODELS}
    ref = HFReference(dirs.__getitem__)
    rows, failures = [], []
    started = time.monotonic()
    for i, d in enumerate(draws):
        try:
            r = check_draw(d, dirs[d.model], ref, ns.device)
            rows.append(
                {
                    **dataclasses.asdict(d),
                    "ok": True,
                    "seconds": round(r.seconds, 2),
                    "num_preemptions": r.num_preemptions,
                    "max_groups_spanned": r.max_groups_spanned,
                    "num_idle_group_steps": r.num_idle_group_steps,
                }
            )
        except Exception as e:  # noqa: BLE001 - every failure is recorded, the sweep goes on
            failures.append(d.label())
            rows.append({**dataclasses.asdict(d), "ok": False, "error": f"{type(e).__name__}: {e}"[:2000]})
        print(f"[{i + 1}/{len(draws)}] {'ok  ' if rows[-1]['ok'] else 'FAIL'} {d.label()}", flush=True)
    ok = [r for r in rows if r["ok"]]
    summary = {
        "command": " ".join(sys.argv),
        "device": ns.device if ns.device == "cpu" else torch.cuda.get_device_name(0),
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "num_draws": len(rows),
        "num_exact": len(ok),
        "num_failed": len(failures),
        "wall_s": round(time.monotonic() - started, 1),
        "by_layout": _count(rows, lambda r: f"tp{r['tp']}xspp{r['spp']}xkvp{r['kvp']}"),
        "by_model": _count(rows, lambda r: r["model"]),
        "draws_with_preemption": sum(r["num_preemptions"] > 0 for r in ok),
        "draws_with_idle_kvp_groups": sum(r["num_idle_group_steps"] > 0 for r in ok),
        "failures": failures,
        "draws": rows,
    }
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps(summary, indent=1))
    print(f"{len(ok)}/{len(rows)} draws exact; summary in {ns.out}")
    sys.exit(1 if failures else 0)


def _count(rows: list[dict], key) -> dict[str, list[int]]:
    """key -> [draws, exact]."""
    out: dict[str, list[int]] = {}
    for r in rows:
        c = out.setdefault(key(r), [0, 0])
        c[0] += 1
        c[1] += int(r["ok"])
    return dict(sorted(out.items()))


if __name__ == "__main__":
    main()
