"""Check that a parallel layout (TP x SPP x KVP) fits a model and the machine, before
any process is started. Every error names the numbers involved."""

from __future__ import annotations

from mnemosyne.config import ModelConfig, ParallelConfig
from mnemosyne.errors import ConfigError


def check_layout(model_cfg: ModelConfig, parallel: ParallelConfig, num_devices: int | None) -> None:
    """Raise `ConfigError` when `parallel` cannot serve `model_cfg`, or needs more than
    `num_devices` devices (None: do not check the device count, e.g. on CPU)."""
    parallel.validate()
    tp = parallel.tp
    if model_cfg.num_heads % tp:
        raise ConfigError(f"num_heads {model_cfg.num_heads} is not divisible by tensor parallel size tp={tp}")
    num_kv_heads = model_cfg.num_kv_heads
    if num_kv_heads % tp and tp % num_kv_heads:
        raise ConfigError(
            f"num_kv_heads {num_kv_heads} and tensor parallel size tp={tp}: one must divide the other "
            f"(KV heads are split over TP ranks, or replicated when tp > num_kv_heads)"
        )
    if model_cfg.intermediate_size % tp:
        raise ConfigError(
            f"intermediate_size {model_cfg.intermediate_size} is not divisible by "
            f"tensor parallel size tp={tp}"
        )
    if parallel.spp > model_cfg.num_layers:
        raise ConfigError(
            f"pipeline size spp={parallel.spp} exceeds the model's {model_cfg.num_layers} layers "
            f"(every stage needs at least one layer)"
        )
    world = parallel.world_size
    if num_devices is not None and world > num_devices:
        raise ConfigError(
            f"layout tp={tp} x spp={parallel.spp} x kvp={parallel.kvp} needs {world} devices, "
            f"only {num_devices} available"
        )
