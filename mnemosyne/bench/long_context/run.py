"""Long-context benchmark on one GPU, against the hardware floor and Hugging Face transformers.

    mnemosyne bench long-context --out benchmarks/results/long_context_h200_DATE.json

Builds a random-weight model of a real architecture's shape (default Llama-3-8B; no
download: config.json only, weights drawn on the GPU) and runs, each part in its own
process so that each starts with the whole GPU:

  kernels  attention kernel throughput vs floor (kernels.py)
  hf       HF transformers, same weights: TTFT/TBT at --hf-contexts, peak memory, OOM point
  engine   Mnemosyne: end-to-end TTFT/TBT at --e2e, decode steps up to the KV capacity,
           prefill chunk steps, TTFT vs context (engine.py)

Writes one JSON (every figure beside its floor) and a PNG next to it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

for _k, _v in (
    ("NCCL_NVLS_ENABLE", "0"),
    ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
    ("NVSHMEM_DISABLE_NVLS", "1"),
):
    os.environ[_k] = _v

LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0}
SHAPES: dict[str, dict] = {
    "llama3-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
        rope_parameters={**LLAMA3_ROPE, "rope_theta": 500000.0, "factor": 8.0,
                         "original_max_position_embeddings": 8192},
    ),
    "llama3.2-1b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
        rope_parameters={**LLAMA3_ROPE, "rope_theta": 500000.0, "factor": 32.0,
                         "original_max_position_embeddings": 8192},
    ),
    "tiny-llama": dict(  # CPU smoke runs of the benchmarks
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=512, tie_word_embeddings=True,
        rope_parameters={**LLAMA3_ROPE, "rope_theta": 500000.0, "factor": 8.0,
                         "original_max_position_embeddings": 64},
    ),
}  # fmt: skip


# Positions the long-context runs declare (the llama3 rope extended past 10M): max_model_len
# defaults to max_position_embeddings and must exceed the one-GPU KV capacity (the 1B shape
# holds ~4M tokens on an H200), else the decode sweep outgrows the CUDA graphs' block table.
LONG_MAX_POSITIONS = 1 << 24


def write_model_dir(shape: str, root: Path, max_positions: int = 1 << 21) -> Path:
    """A model directory with only config.json (load it with load_format=dummy)."""
    path = root / shape
    path.mkdir(parents=True, exist_ok=True)
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "rms_norm_eps": 1e-5,
        "max_position_embeddings": max_positions, "bos_token_id": 128000, "eos_token_id": 128001,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "torch_dtype": "bfloat16",
        **SHAPES[shape],
    }  # fmt: skip
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    return path


def parse_layout(name: str) -> dict[str, int]:
    """'tp2xspp2' -> {'tp': 2, 'spp': 2, 'kvp': 1} (the multi-GPU benchmarks' layout names)."""
    sizes = {"tp": 1, "spp": 1, "kvp": 1}
    for part in name.split("x"):
        m = re.fullmatch(r"(tp|spp|kvp)(\d+)", part)
        if m is None:
            raise SystemExit(f"bad layout {name!r}: expected e.g. tp4, tp2xspp2, spp2xkvp2")
        sizes[m.group(1)] = int(m.group(2))
    return sizes


def _part(ns: argparse.Namespace, model_dir: Path) -> dict:
    if ns.part == "kernels":
        from mnemosyne.bench.long_context.kernels import run_all

        return {"results": run_all()}
    if ns.part == "hf":
        from mnemosyne.bench.long_context.hf import run

        return run(model_dir, ns.hf_contexts, ns.num_decode, progress=ns.part_out)
    from mnemosyne.bench.long_context.engine import run

    return run(model_dir, ns.chunk, ns.e2e, ns.num_decode, ns.kv_fraction)


def write_result(result: dict, out: Path | None) -> None:
    """A benchmark's result as JSON: to `out` (its folder made) or, without one, to stdout."""
    text = json.dumps(result, indent=1)
    if out is None:
        print(text)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")


def device_info() -> dict:
    import torch

    if not torch.cuda.is_available():
        import platform

        return {"gpu": None, "cpu": platform.processor() or platform.machine(), "torch": torch.__version__}
    import triton

    return {
        "gpu": torch.cuda.get_device_name(), "count": torch.cuda.device_count(),
        "torch": torch.__version__, "triton": triton.__version__, "cudnn": torch.backends.cudnn.version(),
    }  # fmt: skip


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--shape", choices=sorted(SHAPES), default="llama3-8b", help="model shape (random weights)"
    )
    ap.add_argument("--parts", default="kernels,hf,engine", help="comma-separated parts to run")
    ap.add_argument("--part", choices=["kernels", "hf", "engine"], help=argparse.SUPPRESS)
    ap.add_argument("--part-out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--chunk", type=int, default=8192, help="prefill chunk (and token budget)")
    ap.add_argument(
        "--e2e", type=_ints, default=[32768, 131072], help="contexts measured end to end (comma-separated)"
    )
    ap.add_argument(
        "--hf-contexts", type=_ints, default=[32768, 131072, 524288], help="contexts for HF transformers"
    )
    ap.add_argument("--num-decode", type=int, default=16, help="decode steps per measurement")
    ap.add_argument(
        "--kv-fraction", type=float, default=0.97, help="fraction of free memory for the KV cache"
    )
    ap.add_argument("--part-timeout", type=float, default=400.0, help="seconds per part")
    ap.add_argument("--out", type=Path, default=None, help="result JSON (a PNG is written beside it)")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def run(ns: argparse.Namespace, argv: list[str]) -> int:
    """The whole benchmark (each part in a child process given `argv`), or one part."""
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model_dir(ns.shape, Path(tmp), LONG_MAX_POSITIONS)
        if ns.part:  # a child process: one part
            ns.part_out.write_text(json.dumps(_part(ns, model_dir), indent=1))
            return 0
        result: dict = {
            "benchmark": "long_context", "shape": ns.shape, "config": SHAPES[ns.shape],
            "date": datetime.date.today().isoformat(), "device": device_info(),
            "command": "mnemosyne bench long-context " + shlex.join(argv),
            "floors": {"copy_TBps": 4.2, "matmul_TFLOPs": 800, "attention_TFLOPs": 590},
        }  # fmt: skip
        for part in ns.parts.split(","):
            part_out = Path(tmp) / f"{part}.json"
            cmd = [sys.executable, "-m", __name__, "--part", part, "--part-out", str(part_out), *argv]
            print(f"== {part}", flush=True)
            try:
                proc = subprocess.run(cmd, timeout=ns.part_timeout)
                result[part] = (
                    json.loads(part_out.read_text())
                    if part_out.exists()
                    else {"error": f"exit {proc.returncode}"}
                )
            except subprocess.TimeoutExpired:
                result[part] = {"error": f"did not finish within {ns.part_timeout} s"}
        write_result(result, ns.out)
        if ns.out is not None:
            from mnemosyne.bench.long_context.plot import plot

            plot(result, ns.out.with_suffix(".png"))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(ap)
    return run(ap.parse_args(argv), argv)


if __name__ == "__main__":
    sys.exit(main())
