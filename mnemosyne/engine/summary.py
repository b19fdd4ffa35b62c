"""The start-up summary: one block saying what an engine is serving and how.

`engine_summary` returns (name, value) lines; a new engine feature adds its own line
here (a policy or profile object describes itself with `describe()` when it has one).
"""

from __future__ import annotations

import torch

from mnemosyne.config import AttentionBackendKind
from mnemosyne.config_policy import ChunkPolicyKind
from mnemosyne.engine.llm_engine import LLMEngine


def layout(engine: LLMEngine) -> str:
    p = engine.config.parallel
    text = f"tp {p.tp} x spp {p.spp} x kvp {p.kvp} ({p.world_size} worker(s)"
    if p.spp > 1:
        text += f", {p.max_inflight} micro-batches in flight"
    return text + ")"


def _devices(engine: LLMEngine) -> str:
    cfg = engine.config
    n = cfg.parallel.world_size
    if cfg.parallel.driver_address is not None:
        return f"{n} remote worker(s) via {cfg.parallel.driver_address}"
    if cfg.device.startswith("cuda") and torch.cuda.is_available():
        names = sorted({torch.cuda.get_device_name(i) for i in range(min(n, torch.cuda.device_count()))})
        return f"{n} x {', '.join(names)}"
    return f"{n} x {cfg.device}"


def _attention(engine: LLMEngine) -> str:
    cfg = engine.config
    kind = cfg.attention_backend
    if kind is AttentionBackendKind.AUTO:
        resolved = "kernels" if cfg.device.startswith("cuda") else "reference"
        text = f"auto ({resolved})"
    else:
        text = kind.value
    if cfg.device.startswith("cuda"):
        text += ", eager decode" if cfg.enforce_eager else ", CUDA graphs for decode"
    return text


def _describe(policy: object) -> str:
    describe = getattr(policy, "describe", None)
    return describe() if callable(describe) else type(policy).__name__


def engine_summary(
    engine: LLMEngine, model_name: str, startup_s: float | None = None
) -> list[tuple[str, str]]:
    cfg = engine.config
    sched = cfg.scheduler
    block = cfg.cache.block_size
    per_group = [n * block for n in cfg.cache.num_blocks_per_group]
    kv = f"{sum(per_group):,} tokens"
    if len(per_group) > 1:
        kv += " (per KVP group: " + ", ".join(f"{t:,}" for t in per_group) + ")"
    if cfg.cache.max_tokens_per_kvp_group is not None and len(per_group) > 1:
        kv += f"; a request moves on to the next group every {cfg.cache.max_tokens_per_kvp_group:,} tokens"
    chunk = f"{_describe(engine.scheduler.chunk_policy)}"
    if cfg.policy.chunk_policy is ChunkPolicyKind.FIXED:
        chunk += f" (chunk {sched.chunk_size or 'whole prompt'}, {sched.max_num_batched_tokens} tokens per step)"
    else:
        chunk += f" (at most {sched.max_num_batched_tokens} tokens per step)"
    lines = [
        ("model", f"{model_name} ({cfg.model_dir})"),
        ("architecture", cfg.model.architecture),
        ("dtype", str(cfg.model.dtype).removeprefix("torch.")),
        ("devices", _devices(engine)),
        ("layout", layout(engine)),
        ("attention", _attention(engine)),
        ("max_model_len", f"{sched.max_model_len:,} (model limit {cfg.model.max_position_embeddings:,})"),
        ("KV capacity", kv),
        ("block size", f"{block} tokens"),
        ("chunk policy", chunk),
        (
            "scheduling",
            f"{_describe(engine.scheduler.priority)}, at most {sched.max_num_seqs} requests per step",
        ),
        ("latency model", f"{engine.policies.latency_source} (TBT target {cfg.policy.tbt_slo_s * 1e3:g} ms)"),
        ("prefix caching", "on" if cfg.cache.enable_prefix_caching else "off"),
        ("async scheduling", "on" if cfg.scheduler.async_scheduling else "off"),
        ("sampling defaults", _sampling_defaults(engine)),
    ]
    if startup_s is not None:
        lines.append(("start-up", f"{startup_s:.1f} s (model load, workers, KV allocation)"))
    return lines


def _sampling_defaults(engine: LLMEngine) -> str:
    d = engine.generation_defaults
    if not d:
        return f"none from the model (generation config: {engine.config.generation_config.value})"
    return "generation_config.json: " + ", ".join(f"{k}={v}" for k, v in d.items())


def format_summary(lines: list[tuple[str, str]]) -> str:
    width = max(len(name) for name, _ in lines)
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in lines)
