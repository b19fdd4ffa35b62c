"""Build the scheduler's chunk and priority policies, and the latency model they share.

latency model:  PolicyConfig.latency_profile (a file; its shape, layout and dtype must
                match) > the cached profile with this exact key (`mnemosyne profile`)
                > the roofline model of the device
chunk policy:   FIXED -> FixedChunkPolicy(chunk_size); ADAPTIVE -> AdaptiveChunkPolicy, sizing by
                the latency model corrected online from measured steps (`latency/calibration.py`)
                unless PolicyConfig.online_calibration is off
priority:       FCFS -> FCFSPriority; LARS -> LARSPriority (+ space sharing when adaptive)
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from mnemosyne.config import EngineConfig
from mnemosyne.config_policy import ChunkPolicyKind, SchedulingPolicyKind
from mnemosyne.engine.adaptive_chunking import AdaptiveChunkPolicy
from mnemosyne.engine.chunking import ChunkPolicy, FixedChunkPolicy
from mnemosyne.engine.lane_split import LaneSplitChooser, StepChunks
from mnemosyne.engine.prefill_time import PrefillTimeTable
from mnemosyne.engine.priority import FCFSPriority, LARSPriority, PriorityPolicy
from mnemosyne.errors import ConfigError
from mnemosyne.kv_cache.manager import KVCacheManager
from mnemosyne.latency.beside_lane import BesideLaneLatencyModel, confined_keys_rate
from mnemosyne.latency.calibration import CalibratedLatencyModel, CalibrationConfig, OnlineCalibration
from mnemosyne.latency.model import LatencyModel
from mnemosyne.latency.profile_store import ProfileKey, find_cached_profile, load_profile
from mnemosyne.latency.roofline import (
    DeviceSpec,
    RooflineLatencyModel,
    compute_s,
    device_spec_for,
    weights_read_s,
)
from mnemosyne.latency.shape import Layout, ModelShape
from mnemosyne.latency.transfer import can_transfer, model_for_layout

logger = logging.getLogger(__name__)


@dataclass
class SchedulingPolicies:
    chunk_policy: ChunkPolicy
    priority: PriorityPolicy
    latency_model: LatencyModel
    latency_source: str  # "roofline" or the profile's path
    prefill_time: PrefillTimeTable
    calibration: OnlineCalibration | None = None  # fed every processed step; None: no correction
    beside_lane: BesideLaneLatencyModel | None = None  # the steps beside a prefill lane (with a lane)
    lane_split: LaneSplitChooser | None = None  # each lane chunk's split of the SMs (with a lane)


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


def profile_key(config: EngineConfig) -> ProfileKey:
    p = config.parallel
    return ProfileKey(
        device_name=device_name(config.device),
        shape=ModelShape.from_model_config(config.model),
        layout=Layout(p.tp, p.spp, p.kvp),
        dtype=str(config.model.dtype).removeprefix("torch."),
    )


def resolve_latency_model(config: EngineConfig, cache_dir: Path | None = None) -> tuple[LatencyModel, str]:
    """The explicit profile, else a cached one measured for this key, else one cached for
    this key's tp without spp / kvp (transferred: `latency/transfer.py`), else the roofline."""
    key = profile_key(config)
    spec = device_spec_for(key.device_name)
    explicit = config.policy.latency_profile
    if explicit is not None:
        profile = load_profile(explicit)
        mine, theirs = key.to_dict(), profile.key.to_dict()
        for field in ("shape", "dtype"):
            if mine[field] != theirs[field]:
                raise ConfigError(
                    f"latency profile {explicit} was measured for {field} {theirs[field]}, "
                    f"but this engine has {mine[field]}"
                )
        if key.device_name != profile.key.device_name:
            logger.warning("latency profile %s was measured on %s, running on %s", explicit,
                           profile.key.device_name, key.device_name)  # fmt: skip
        model = model_for_layout(profile.model, key.shape, key.layout, spec)
        if model is profile.model:
            return model, str(explicit)
        if model is None:
            raise ConfigError(
                f"latency profile {explicit} was measured for layout {theirs['layout']}, but this engine has "
                f"{mine['layout']} (a profile transfers only from the same tp without spp or kvp)"
            )
        return model, f"{explicit}, measured at {profile.key.layout}"
    if cache_dir is None:
        from mnemosyne.models.default_model import cache_dir as default_cache_dir

        cache_dir = default_cache_dir()
    cached = find_cached_profile(cache_dir, key)
    if cached is not None:
        return cached.model, f"cached profile for {key.device_name}"
    base_key = replace(key, layout=Layout(key.layout.tp))
    if can_transfer(base_key.layout, key.layout):
        base = find_cached_profile(cache_dir, base_key)
        if base is not None:
            model = model_for_layout(base.model, key.shape, key.layout, spec)
            assert model is not None
            return model, f"cached profile for {key.device_name}, measured at {base_key.layout}"
    return RooflineLatencyModel(key.shape, key.layout, spec), "roofline"


def make_policies(
    config: EngineConfig,
    kv_manager: KVCacheManager,
    latency: tuple[LatencyModel, str] | None = None,
    gpu: DeviceSpec | None = None,
) -> SchedulingPolicies:
    """`latency`: (model, source) and `gpu`: the device, to use instead of resolving them for
    this machine (the simulator)."""
    pc = config.policy
    model, source = latency if latency is not None else resolve_latency_model(config)
    prefill_time = PrefillTimeTable(  # a prefill alone: steps with no decode
        model,
        pc.prefill_only_step_s,
        num_kvp_groups=kv_manager.num_kvp_groups,
        max_tokens_per_kvp_group=kv_manager.max_tokens_per_kvp_group,
        granularity_tokens=pc.chunk_granularity_tokens,
    )
    # The whole table now, not on a long arrival: every prompt the cache can hold.
    prefill_time.time_s(min(config.scheduler.max_model_len, kv_manager.capacity_tokens_per_request))
    priority: PriorityPolicy = FCFSPriority()
    lars: LARSPriority | None = None
    if pc.scheduling_policy is SchedulingPolicyKind.LARS:
        lars = LARSPriority(prefill_time, pc.deadline_factor, pc.min_deadline_s)
        priority = lars
    chunk_policy: ChunkPolicy
    calibration: OnlineCalibration | None = None
    sizing_model: LatencyModel = model
    if pc.chunk_policy is ChunkPolicyKind.ADAPTIVE and pc.online_calibration:
        calibration = OnlineCalibration(
            CalibrationConfig(quantile=pc.tbt_slo_quantile), num_stages=config.parallel.spp
        )
        sizing_model = CalibratedLatencyModel(model, calibration)
    beside_lane: BesideLaneLatencyModel | None = None
    if config.scheduler.prefill_lane is not None:  # (it chooses the lane's SM split under any policy)
        spec = gpu if gpu is not None else device_spec_for(device_name(config.device))
        shape, tp = ModelShape.from_model_config(config.model), config.parallel.tp
        beside_lane = sizing_model = BesideLaneLatencyModel(
            sizing_model,
            model,
            weights_read_s(shape, tp, spec),
            functools.partial(compute_s, shape, tp, spec),
            keys_rate=confined_keys_rate(shape.head_dim, shape.dtype_bytes, config.cache.block_size),
        )
    if pc.chunk_policy is ChunkPolicyKind.ADAPTIVE:
        chunk_policy = AdaptiveChunkPolicy(
            sizing_model,
            kv_manager,
            pc.tbt_slo_s,
            prefill_only_step_s=pc.prefill_only_step_s,
            granularity_tokens=pc.chunk_granularity_tokens,
            min_chunk_tokens=pc.min_chunk_tokens,
            lars=lars,
            long_prefill_threshold_tokens=pc.long_prefill_threshold_tokens,
            max_decoding_step_tokens=pc.max_decoding_step_tokens,
        )
        chunks = StepChunks(
            pc.chunk_granularity_tokens,
            pc.min_chunk_tokens,
            pc.max_decoding_step_tokens or config.scheduler.max_num_batched_tokens,
        )
    else:
        chunk_policy = FixedChunkPolicy(config.scheduler.chunk_size)
        chunks = StepChunks(*(config.scheduler.chunk_size,) * 3)
    lane_split = LaneSplitChooser(beside_lane, pc.tbt_slo_s, lars, chunks) if beside_lane is not None else None
    return SchedulingPolicies(
        chunk_policy, priority, model, source, prefill_time, calibration, beside_lane, lane_split
    )
