"""Streams on CUDA green contexts: two disjoint sets of a device's SMs.

    cuDevSmResourceSplitByCount(the device's SMs, first group of `first_sms`)
        -> first: `first_sms` SMs (rounded up by the driver to its granule: 8 on Hopper)
        -> rest:  every other SM
    one green context per set, one non-blocking stream in each, wrapped as torch streams

Kernels launched on a stream run only on its set's SMs; a plain stream of the device still
runs on every SM. The prefill lane (worker/prefill_lane.py) runs on the rest and leaves the
first set idle for the engine's steps. Needs `cuda-bindings` (the driver's green-context API;
torch's own `GreenContext` cannot make two disjoint sets).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mnemosyne.errors import ConfigError


@dataclass(frozen=True)
class SmSplit:
    first: torch.cuda.Stream  # [first_sms SMs]
    rest: torch.cuda.Stream  # [num_sms - first_sms SMs]
    first_sms: int
    rest_sms: int


def split_sms(device: torch.device, first_sms: int) -> SmSplit:
    """Two green-context streams on `device`: `first_sms` SMs and the rest."""
    try:
        from cuda.bindings import driver
    except ImportError as e:
        raise ConfigError(
            "the prefill lane needs the cuda-bindings package (pip install 'mnemosyne[lane]' or cuda-bindings) "
            "for the driver's green contexts"
        ) from e

    def ok(result: tuple) -> object:  # cuda-bindings returns (CUresult, *values)
        if result[0] != driver.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"CUDA driver error {result[0]}")
        return result[1:] if len(result) > 2 else (result[1] if len(result) == 2 else None)

    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    if not 0 < first_sms < num_sms:
        raise ConfigError(f"cannot set {first_sms} of the device's {num_sms} SMs apart")
    dev = ok(driver.cuDeviceGet(device.index or 0))
    whole = ok(driver.cuDeviceGetDevResource(dev, driver.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM))
    groups, _, rest = ok(driver.cuDevSmResourceSplitByCount(1, whole, 0, first_sms))
    streams = []
    for resource in (groups[0], rest):
        desc = ok(driver.cuDevResourceGenerateDesc([resource], 1))
        ctx = ok(
            driver.cuGreenCtxCreate(desc, dev, driver.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM)
        )
        raw = ok(driver.cuGreenCtxStreamCreate(ctx, driver.CUstream_flags.CU_STREAM_NON_BLOCKING, 0))
        # int(raw) is the CUstream handle (raw.getPtr() is the address of the wrapper's copy)
        streams.append(torch.cuda.get_stream_from_external(int(raw), device))
    return SmSplit(streams[0], streams[1], int(groups[0].sm.smCount), int(rest.sm.smCount))
