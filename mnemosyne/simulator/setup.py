"""The engine configuration and latency model of a simulated deployment: a model directory
(config.json only), a layout and a GPU kind. Nothing touches a device or reads weights.

    KV budget per GPU = kv_cache_memory_gb if given, else
                        memory_fraction * GPU memory - the GPU's weight shard
    latency model     = the profile given (its shape must match; its layout too, or be the
                        same tp without spp / kvp: `latency/transfer.py`), else the
                        roofline of the GPU's `DeviceSpec`: what the engine's policies predict
                        steps by (adaptive chunking, LARS, online calibration)
    device model      = optional second profile (`--device-latency-profile`): how long the
                        simulated device takes per step. The engine's policies still predict
                        with the latency model and calibrate it online against these times,
                        as the real engine calibrates its profile against the GPU.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from mnemosyne.config import EngineConfig, ModelConfig
from mnemosyne.engine.args import EngineArgs, weight_bytes_per_device
from mnemosyne.errors import ConfigError
from mnemosyne.latency.model import LatencyModel
from mnemosyne.latency.profile_store import load_profile
from mnemosyne.latency.roofline import DEVICE_SPECS, DeviceSpec, RooflineLatencyModel
from mnemosyne.latency.shape import Layout, ModelShape
from mnemosyne.latency.transfer import model_for_layout
from mnemosyne.parallel.validate import check_layout

GPU_MEMORY_FRACTION = 0.9  # of device memory for weights + KV (the rest: activations, context)


def device_spec(gpu: str) -> DeviceSpec:
    try:
        return DEVICE_SPECS[gpu.lower()]
    except KeyError:
        raise ConfigError(f"unknown --gpu {gpu!r}; known: {', '.join(sorted(DEVICE_SPECS))}") from None


def load_model_config(model_dir: str | Path, dtype: torch.dtype = torch.bfloat16) -> ModelConfig:
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path} has no config.json")
    return ModelConfig.from_pretrained(path, dtype)


def kv_budget_bytes(model_cfg: ModelConfig, args: EngineArgs, spec: DeviceSpec) -> float:
    if args.kv_cache_memory_gb is not None:
        return args.kv_cache_memory_gb * 2**30
    budget = GPU_MEMORY_FRACTION * spec.memory_capacity_bytes - weight_bytes_per_device(
        model_cfg, args.parallel_config()
    )
    if budget <= 0:
        p = args.parallel_config()
        raise ConfigError(
            f"the weight shard of tp={p.tp} x spp={p.spp} does not fit {spec.name}'s "
            f"{spec.memory_capacity_bytes / 2**30:.0f} GiB"
        )
    return budget


def simulated_engine_config(model_dir: str | Path, args: EngineArgs, spec: DeviceSpec) -> EngineConfig:
    """The EngineConfig the real engine would build on `spec` GPUs (bf16, prefix caching off:
    a trace has lengths, not contents). Contexts past the model's trained positions are allowed:
    a simulation plans for them."""
    args = dataclasses.replace(args, allow_long_max_model_len=True)
    args.validate()
    model_cfg = load_model_config(model_dir)
    check_layout(model_cfg, args.parallel_config(), None)
    return args.engine_config_for(model_dir, model_cfg, "simulated", kv_budget_bytes(model_cfg, args, spec))


def latency_model_for(config: EngineConfig, spec: DeviceSpec) -> tuple[LatencyModel, str]:
    """(model, source): the explicit profile if any, else the roofline of `spec`."""
    path = config.policy.latency_profile
    if path is None:
        return RooflineLatencyModel(*_shape_layout(config), spec), f"roofline {spec.name}"
    return matching_profile_model(config, path, spec), str(path)


def matching_profile_model(config: EngineConfig, path: str | Path, spec: DeviceSpec) -> LatencyModel:
    """The model of the profile at `path`: measured for the simulation's shape, and for its
    layout or for its tp without spp / kvp (transferred: `latency/transfer.py`)."""
    shape, layout = _shape_layout(config)
    profile = load_profile(path)
    model = model_for_layout(profile.model, shape, layout, spec) if profile.key.shape == shape else None
    if model is None:
        raise ConfigError(
            f"latency profile {path} was measured for {profile.key.shape} {profile.key.layout}, "
            f"but the simulation is for {shape} {layout} (a profile transfers only to the same "
            "shape and tp, from a layout without spp or kvp)"
        )
    return model


def _shape_layout(config: EngineConfig) -> tuple[ModelShape, Layout]:
    p = config.parallel
    return ModelShape.from_model_config(config.model), Layout(p.tp, p.spp, p.kvp)
