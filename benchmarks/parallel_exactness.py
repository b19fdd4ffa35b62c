"""Parallel layouts vs one device: greedy tokens and logprobs on a random Llama-3.2-1B-shaped model.

    python -m benchmarks.parallel_exactness                       # 1b shape, bf16, CUDA, 6 layouts, HF too
    python -m benchmarks.parallel_exactness --shape tiny --device cpu --dtype float32 --layouts tp2,spp2

The model is built at run time from a fixed seed (no download) and saved as safetensors. Each layout
runs the same prompts (greedy, ignore_eos, chunked prefills sharing steps with decodes) and is compared
with the single-device Mnemosyne run in the same dtype (and, informationally, with HF `generate`).

Tolerance (bf16 keeps 8 significant bits: a logprob of magnitude ~12 is rounded in steps of 2^-4):
  * prompt logprobs and sampled-token logprobs (positions with the same prefix as the reference):
    mean |diff| < 0.05 and max |diff| < 0.5 nats;
  * greedy tokens identical, or each request's first differing token is a bf16 near-tie: the
    reference's top-2 logprob gap there is < 0.1 nats (logits are bf16: steps of 1/32 in [2, 4),
    1/16 in [4, 8); a random 128k-vocab model has exact top-2 ties at a few percent of positions).
  A layout PASSes when all of these hold. The table also says whether tokens are strictly identical;
  `--dtype float32` (same weights, no bf16 ties) should give identical tokens and diffs ~1e-5.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import re
import shlex
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

for _k, _v in (
    ("NCCL_NVLS_ENABLE", "0"),
    ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
    ("NVSHMEM_DISABLE_NVLS", "1"),
):
    os.environ[_k] = _v  # no NVLink multicast; workers inherit the environment
os.environ.setdefault("TORCH_NCCL_SHOW_EAGER_INIT_P2P_SERIALIZATION_WARNING", "false")  # one per SPP step

import torch  # noqa: E402
import transformers  # noqa: E402

from mnemosyne import LLM, SamplingParams  # noqa: E402
from mnemosyne.bench.long_context.run import parse_layout  # noqa: E402

DEFAULT_LAYOUTS = "tp4,spp4,kvp4,tp2xspp2,spp2xkvp2,tp2xkvp2"
MEAN_TOL, MAX_TOL, NEAR_TIE = 0.05, 0.5, 0.1
NUM_NEW = 32
ROPE = dict(rope_type="llama3", rope_theta=500000.0, low_freq_factor=1.0, high_freq_factor=4.0, factor=32.0)
SHAPES: dict[str, dict] = {
    "1b": dict(
        hf=dict(
            hidden_size=2048,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            intermediate_size=8192,
            vocab_size=128256,
            max_position_embeddings=131072,
            rope_parameters={**ROPE, "original_max_position_embeddings": 8192},
            bos_token_id=128000,
            eos_token_id=128001,
            initializer_range=0.02,
        ),
        prompt_lens=(700, 300, 1500, 57),
        chunk_size=256,
        max_num_batched_tokens=1024,
        max_token_id=128000,
    ),
    "tiny": dict(
        hf=dict(
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=8,
            intermediate_size=128,
            vocab_size=320,
            max_position_embeddings=2048,
            rope_parameters={**ROPE, "original_max_position_embeddings": 64},
            bos_token_id=1,
            eos_token_id=2,
            initializer_range=0.1,
        ),
        prompt_lens=(150, 60, 300, 11),
        chunk_size=32,
        max_num_batched_tokens=96,
        max_token_id=320,
    ),
}
BLOCK_SIZE = 16


@dataclass
class Run:
    """Per prompt: new tokens, prompt logprobs (positions 1..P-1), and per new token {token: logprob}
    holding the sampled token and the top-2."""

    tokens: list[list[int]]
    prompt_lp: list[list[float]]
    gen_lp: list[list[dict[int, float]]]


def build_model(shape: str, workdir: Path, seed: int, embed_std: float | None = None) -> Path:
    """`embed_std`: re-draw the (tied) embedding with this std. HF's 0.02 makes next-token
    distributions over 128K tokens nearly flat (logit std ~0.9), unlike a trained model's;
    a larger std gives peaked, trained-like distributions whose greedy pick is decided by
    the model, not by rounding."""
    out = workdir / (f"random-llama-{shape}" + ("" if embed_std is None else f"-embed{embed_std}"))
    cfg = transformers.LlamaConfig(**SHAPES[shape]["hf"], rms_norm_eps=1e-5, tie_word_embeddings=True)
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    if embed_std is not None:
        model.get_input_embeddings().weight.data.normal_(0.0, embed_std)
    model.save_pretrained(out, safe_serialization=True)
    del model
    _free()
    return out


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def make_prompts(shape: str, seed: int, prompt_lens: list[int] | None = None) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed + 1)
    return [
        torch.randint(3, SHAPES[shape]["max_token_id"], (n,), generator=g).tolist()
        for n in (prompt_lens or SHAPES[shape]["prompt_lens"])
    ]


def run_mnemosyne(
    model_dir: Path,
    prompts: list[list[int]],
    args: argparse.Namespace,
    layout: dict[str, int],
    kvp_tokens: int | None,
) -> tuple[Run, float, float]:
    """One LLM: (outputs, startup seconds, generate seconds); the workers are stopped on return."""
    shape = SHAPES[args.shape]
    t0 = time.perf_counter()
    with LLM(
        model=str(model_dir),
        dtype=args.dtype,
        device=args.device,
        block_size=BLOCK_SIZE,
        chunk_size=shape["chunk_size"],
        max_num_batched_tokens=shape["max_num_batched_tokens"],
        kv_cache_memory_gb=args.kv_cache_gb,
        max_tokens_per_kvp_group=kvp_tokens,
        worker_timeout_s=args.worker_timeout,
        **layout,
    ) as llm:
        t1 = time.perf_counter()
        params = SamplingParams(
            temperature=0, max_tokens=NUM_NEW, ignore_eos=True, logprobs=2, prompt_logprobs=0
        )
        outs = llm.generate(prompts, params)
        t2 = time.perf_counter()
    _free()
    for o in outs:
        if o.finish_reason != "length" or len(o.token_ids) != NUM_NEW:
            raise RuntimeError(f"request {o.request_id}: {len(o.token_ids)} tokens, finish {o.finish_reason}")
    run = Run(
        tokens=[list(o.token_ids) for o in outs],
        prompt_lp=[[o.prompt_logprobs[i][p[i]] for i in range(1, len(p))] for o, p in zip(outs, prompts)],
        gen_lp=[[dict(d) for d in o.logprobs] for o in outs],
    )
    return run, t1 - t0, t2 - t1


@torch.no_grad()
def run_hf(model_dir: Path, prompts: list[list[int]], args: argparse.Namespace) -> tuple[Run, float]:
    """HF greedy `generate`, then one forward over each whole sequence for the logprobs."""
    dtype = getattr(torch, args.dtype)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(args.device).eval()
    run, elapsed = Run([], [], []), 0.0
    for prompt in prompts:
        ids = torch.tensor([prompt], device=args.device)
        t0 = time.perf_counter()
        gen = hf.generate(ids, max_new_tokens=NUM_NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
        elapsed += time.perf_counter() - t0
        logp = torch.log_softmax(hf(gen).logits[0].float(), dim=-1).cpu()
        seq, n = gen[0].tolist(), len(prompt)
        run.tokens.append(seq[n:])
        run.prompt_lp.append([logp[i - 1, prompt[i]].item() for i in range(1, n)])
        rows = []
        for i, tok in enumerate(seq[n:]):
            top = logp[n + i - 1].topk(2)
            rows.append(
                {**dict(zip(top.indices.tolist(), top.values.tolist())), tok: logp[n + i - 1, tok].item()}
            )
        run.gen_lp.append(rows)
    del hf
    _free()
    return run, elapsed


def _top2(d: dict[int, float]) -> list[tuple[int, float]]:
    return sorted(d.items(), key=lambda kv: -kv[1])[:2]


def compare(ref: Run, got: Run) -> dict:
    prompt_diffs = [abs(a - b) for r, g in zip(ref.prompt_lp, got.prompt_lp) for a, b in zip(r, g)]
    gen_diffs: list[float] = []
    divergences = []
    for p, (rt, gt) in enumerate(zip(ref.tokens, got.tokens)):
        d = next((i for i, (a, b) in enumerate(zip(rt, gt)) if a != b), None)
        for i in range(len(rt) if d is None else d + 1):  # positions whose prefix matches the reference
            if rt[i] in got.gen_lp[p][i]:
                gen_diffs.append(abs(ref.gen_lp[p][i][rt[i]] - got.gen_lp[p][i][rt[i]]))
        if d is not None:
            (t1, l1), (t2, l2) = _top2(ref.gen_lp[p][d])
            divergences.append(
                dict(
                    prompt=p,
                    position=d,
                    ref_token=rt[d],
                    got_token=gt[d],
                    ref_top2_gap=l1 - l2,
                    got_is_ref_second=gt[d] == t2,
                    near_tie=l1 - l2 < NEAR_TIE,
                )
            )
    stats = dict(
        tokens_identical=not divergences,
        divergences=divergences,
        prompt_lp_max=max(prompt_diffs, default=0.0),
        prompt_lp_mean=_mean(prompt_diffs),
        gen_lp_max=max(gen_diffs, default=0.0),
        gen_lp_mean=_mean(gen_diffs),
        gen_lp_count=len(gen_diffs),
    )
    ok = all(d["near_tie"] for d in divergences)
    for k in ("prompt_lp", "gen_lp"):
        ok = ok and stats[f"{k}_mean"] < MEAN_TOL and stats[f"{k}_max"] < MAX_TOL
    stats["verdict"] = "PASS" if ok else "FAIL"
    return stats


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def device_info(device: str) -> tuple[str, int | None]:
    """(name, devices available for a layout); CPU: gloo processes, no limit."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0), torch.cuda.device_count()
    return "cpu", None


def summary(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"# parallel exactness: {meta['shape']} random Llama ({meta['num_params'] / 1e6:.1f}M params), "
        f"{meta['dtype']}, {meta['device_name']} x{meta['device_count']}, {meta['date']}",
        f"# command: {meta['command']}",
        f"# torch {meta['torch']}, transformers {meta['transformers']}; prompts {meta['prompt_lens']} tokens "
        f"+ {NUM_NEW} greedy; chunk {meta['chunk_size']}, budget {meta['max_num_batched_tokens']}, "
        f"block {BLOCK_SIZE}",
        f"# reference: Mnemosyne on 1 device; tolerance: prompt and sampled logprobs mean < {MEAN_TOL}, "
        f"max < {MAX_TOL} nats; token flips allowed only at near-ties (ref top-2 gap < {NEAR_TIE})",
        "",
        f"| {'layout':<20} | dev | T/group | startup s | generate s | tokens | first diff (prompt@pos: gap) "
        "| prompt lp max / mean | sampled lp max / mean | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if r.get("skipped") or r.get("error"):
            lines.append(
                f"| {r['layout']:<20} | {r['devices']} | | | | | | | | "
                f"{'SKIP: ' + r['skipped'] if r.get('skipped') else 'FAIL (error)'} |"
            )
            continue
        divs = r["divergences"]
        toks = "identical" if not divs else f"{len(divs)}/{len(meta['prompt_lens'])} differ"
        first = (
            "; ".join(
                f"{d['prompt']}@{d['position']}: {d['ref_top2_gap']:.3f}{'*' if d['got_is_ref_second'] else ''}"
                for d in divs
            )
            or "-"
        )
        kvp_t = r.get("max_tokens_per_kvp_group") or "-"
        lines.append(
            f"| {r['layout']:<20} | {r['devices']} | {kvp_t} | {r.get('startup_s', 0):.1f} | {r['generate_s']:.2f} "
            f"| {toks} | {first} | {r['prompt_lp_max']:.2e} / {r['prompt_lp_mean']:.2e} "
            f"| {r['gen_lp_max']:.2e} / {r['gen_lp_mean']:.2e} | {r['verdict']} |"
        )
    notes = [r["note"] for r in rows if r.get("note")]
    notes.append(
        "first diff: prompt@position of the first differing new token, the reference's top-2 logprob "
        "gap there; * = the layout picked the reference's second choice"
    )
    errors = [f"{r['layout']}: {r['error']}" for r in rows if r.get("error")]
    return "\n".join(lines + [""] + [f"- {n}" for n in notes] + [f"- ERROR {e}" for e in errors])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--layouts", default=DEFAULT_LAYOUTS, help="comma-separated, e.g. tp4,tp2xspp2")
    ap.add_argument("--hf", action=argparse.BooleanOptionalAction, default=None, help="default: on for 1b")
    ap.add_argument(
        "--workdir", type=Path, default=None, help="where the random model is saved (default: tmp)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--prompt-lens",
        type=lambda s: [int(float(x)) for x in s.split(",")],
        default=None,
        help="prompt lengths, e.g. 65536 (default: the shape's four prompts)",
    )
    ap.add_argument("--embed-std", type=float, default=None, help="re-draw the tied embedding with this std")
    ap.add_argument(
        "--kv-cache-gb", type=float, default=None, help="KV cache per device (8 on CUDA, 0.25 on CPU)"
    )
    ap.add_argument("--worker-timeout", type=float, default=300.0)
    ap.add_argument(
        "--out", type=Path, default=None, help="JSON results (a .log summary is written beside it)"
    )
    args = ap.parse_args(argv)
    if args.kv_cache_gb is None:
        args.kv_cache_gb = 8.0 if args.device.startswith("cuda") else 0.25
    layouts = [(name, parse_layout(name)) for name in args.layouts.split(",") if name]
    device_name, num_devices = device_info(args.device)
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    if args.out is None:
        slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
        args.out = Path("benchmarks/results") / f"parallel_exactness_{slug}_{date}.json"
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="mnemosyne-pe-")
    workdir = args.workdir or Path(tmp.name)  # type: ignore[union-attr]
    workdir.mkdir(parents=True, exist_ok=True)
    shape = SHAPES[args.shape]
    t0 = time.perf_counter()
    model_dir = build_model(args.shape, workdir, args.seed, args.embed_std)
    print(f"built {model_dir} in {time.perf_counter() - t0:.1f} s", flush=True)
    cfg = transformers.LlamaConfig.from_pretrained(model_dir)
    v, h = cfg.vocab_size, cfg.hidden_size
    num_params = (
        v * h
        + cfg.num_hidden_layers
        * (
            2 * h * cfg.head_dim * (cfg.num_attention_heads + cfg.num_key_value_heads)
            + 3 * h * cfg.intermediate_size
            + 2 * h
        )
        + h
    )
    prompts = make_prompts(args.shape, args.seed, args.prompt_lens)
    longest = max(len(p) for p in prompts) + NUM_NEW
    meta = dict(
        command="python -m benchmarks.parallel_exactness "
        + shlex.join(sys.argv[1:] if argv is None else argv),
        shape=args.shape,
        dtype=args.dtype,
        device=args.device,
        device_name=device_name,
        device_count=num_devices or 1,
        torch=torch.__version__,
        transformers=transformers.__version__,
        python=sys.version.split()[0],
        date=date,
        seed=args.seed,
        num_params=num_params,
        prompt_lens=[len(p) for p in prompts],
        num_new=NUM_NEW,
        block_size=BLOCK_SIZE,
        chunk_size=shape["chunk_size"],
        max_num_batched_tokens=shape["max_num_batched_tokens"],
        kv_cache_gb=args.kv_cache_gb,
        model_config=cfg.to_dict(),
        tolerance=dict(mean=MEAN_TOL, max=MAX_TOL, near_tie=NEAR_TIE),
    )
    rows: list[dict] = []
    print("reference: Mnemosyne on 1 device ...", flush=True)
    ref, ref_start, ref_gen = run_mnemosyne(model_dir, prompts, args, {}, None)
    rows.append(
        dict(
            layout="reference tp1",
            devices=1,
            startup_s=ref_start,
            generate_s=ref_gen,
            **{**compare(ref, ref), "verdict": "(reference)"},
        )
    )
    if args.hf if args.hf is not None else args.shape == "1b":
        print("HF transformers generate on 1 device ...", flush=True)
        hf_run, hf_time = run_hf(model_dir, prompts, args)
        rows.append(
            dict(
                layout="HF generate (info)",
                devices=1,
                startup_s=0.0,
                generate_s=hf_time,
                **compare(ref, hf_run),
                tokens=hf_run.tokens,
            )
        )
    for name, layout in layouts:
        world = layout["tp"] * layout["spp"] * layout["kvp"]
        row: dict = dict(layout=name, devices=world, **layout)
        rows.append(row)
        if num_devices is not None and world > num_devices:
            row["skipped"] = f"needs {world} devices, {num_devices} available"
            print(f"{name}: SKIP ({row['skipped']})", flush=True)
            continue
        kvp_tokens = None
        if layout["kvp"] > 1:  # the longest request fills every KVP group
            kvp_tokens = math.ceil(longest / layout["kvp"] / BLOCK_SIZE) * BLOCK_SIZE
            assert (layout["kvp"] - 1) * kvp_tokens < longest <= layout["kvp"] * kvp_tokens
            row["max_tokens_per_kvp_group"] = kvp_tokens
            row["note"] = (
                f"{name}: max_tokens_per_kvp_group={kvp_tokens}, so the longest request "
                f"({longest} tokens) spans all {layout['kvp']} KVP groups"
            )
        print(f"{name} ...", flush=True)
        try:
            run, start_s, gen_s = run_mnemosyne(model_dir, prompts, args, layout, kvp_tokens)
        except Exception as e:  # record it and go on with the next layout
            row.update(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(), verdict="FAIL")
            print(row["traceback"], file=sys.stderr, flush=True)
            _free()
            continue
        row.update(startup_s=start_s, generate_s=gen_s, **compare(ref, run))
        if not row["tokens_identical"]:
            row["tokens"] = run.tokens
        print(f"{name}: {row['verdict']} (generate {gen_s:.2f} s)", flush=True)
    text = summary(meta, rows)
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = dict(**meta, reference_tokens=ref.tokens, results=rows)
    args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    args.out.with_suffix(".log").write_text(text + "\n")
    print(f"\nwrote {args.out} and {args.out.with_suffix('.log')}")
    if tmp is not None:
        tmp.cleanup()
    layout_rows = [r for r in rows if r["layout"] not in ("reference tp1", "HF generate (info)")]
    return 0 if all(r.get("skipped") or r.get("verdict") == "PASS" for r in layout_rows) else 1


if __name__ == "__main__":
    sys.exit(main())
