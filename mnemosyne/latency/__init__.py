"""Predicted step time: a pure function from a step's composition to seconds (no torch).

The scheduler (adaptive chunking, LARS deadlines) and the simulator call it:

    composition.py  what a step holds, per KVP group (`GroupLoad`, `StepComposition`)
    shape.py        the model shape and the 3D layout the prediction is for
    roofline.py     `DeviceSpec` peaks and `RooflineLatencyModel` (the fallback)
    fitted.py       `FittedLatencyModel`: roofline-shaped terms fitted to a measured profile
    kernel_cost.py  `ChunkCostModel`: measured per-layer chunk attention cost of each kernel path
                    (the attention backend picks paths by it; the fitted model's kernel term)
    profile_store.py  profile JSON, its key (device, shape, layout, dtype) and the cache lookup
"""

from mnemosyne.latency.composition import GroupLoad, StepComposition
from mnemosyne.latency.model import LatencyModel
from mnemosyne.latency.shape import Layout, ModelShape

__all__ = ["GroupLoad", "LatencyModel", "Layout", "ModelShape", "StepComposition"]
