"""A profile measured on one layout, used for a layout with more pipeline stages or KVP groups.

A user profiles once, on one GPU, and serves (or simulates, or plans) a sequence pipeline
or KV-parallel layout of the same TP degree. Measured at (tp, 1, 1), wanted at
(tp, spp, kvp)::

    step(comp) = base(comp without the merge)     the model's layers as measured: a micro-batch
                                                   crosses all L layers either way (spp stages of
                                                   L / spp layers); the base already takes the
                                                   busiest KVP group's sub-batch
               + spp * merge(N_s)                 the KVP all-gather of every layer (roofline:
                                                   a kvp = 1 profile never measured one)
               + (spp - 1) * send(num_tokens)     the stage-to-stage sends (roofline)

Not modelled: each extra stage's own launch overheads (small with CUDA graphs), and
stage imbalance when spp does not divide the layers. Not transferred: tp, whose matmul
shapes and all-reduces change (`model_for_layout` returns None).
"""

from __future__ import annotations

from dataclasses import dataclass

from mnemosyne.latency.composition import StepComposition
from mnemosyne.latency.model import LatencyModel
from mnemosyne.latency.roofline import DeviceSpec, RooflineLatencyModel
from mnemosyne.latency.shape import Layout, ModelShape


@dataclass(frozen=True)
class TransferredLatencyModel:
    layout: Layout  # the layout predicted for
    base: LatencyModel  # measured at Layout(layout.tp, 1, 1)
    roofline: RooflineLatencyModel  # of `layout`: its merge and send terms

    def step_time_s(self, composition: StepComposition) -> float:
        spp = self.layout.spp
        num_tokens = max((g.num_tokens for g in composition.groups), default=0)
        layers = self.base.step_time_s(StepComposition(composition.groups, 0))
        merge = spp * self.roofline.merge_time_s(composition.num_shared_tokens)
        return layers + merge + (spp - 1) * self.roofline.send_time_s(num_tokens)


def can_transfer(measured: Layout, wanted: Layout) -> bool:
    """A profile of `measured` serves `wanted`: the same tp, measured without spp or kvp."""
    return measured.tp == wanted.tp and measured.spp == 1 and measured.kvp == 1 and measured != wanted


def model_for_layout(
    measured: LatencyModel, shape: ModelShape, wanted: Layout, device: DeviceSpec
) -> LatencyModel | None:
    """`measured` for `wanted`: itself when measured there, transferred when it can be, else None."""
    if measured.layout == wanted:
        return measured
    if not can_transfer(measured.layout, wanted):
        return None
    return TransferredLatencyModel(wanted, measured, RooflineLatencyModel(shape, wanted, device))
