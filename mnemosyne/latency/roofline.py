"""Roofline latency model: bytes / bandwidth and FLOPs / peak, from the model shape alone.

Used when no measured profile matches the device, model, layout and dtype. Per
pipeline stage (L = layers of the longest stage, tp-way sharded), for one KVP
group's `GroupLoad`::

    dense     L * max(weight bytes / BW, 2 * params * num_tokens / matmul peak)
    attention L * max(4 * H * D * (prefix pairs + causal pairs + decode keys) / attention peak,
                      KV bytes of (prefix keys + decode keys + chunk tokens) / BW)
    LM head   (last stage) max(vocab * hidden bytes / BW, 2 * vocab * hidden * sampled / peak)
    TP        2 all-reduces per layer of num_tokens * hidden values: latency + 2 (tp-1)/tp bytes / link
    fixed     step_overhead_s (host: plan, launch, sample) + L * layer_overhead_s

    step = spp * (busiest group's stage + KVP merge all-gather) + (spp - 1) * stage send
"""

from __future__ import annotations

from dataclasses import dataclass

from mnemosyne.latency.composition import GroupLoad, StepComposition
from mnemosyne.latency.shape import Layout, ModelShape

_LSE_BYTES = 4  # the float32 LSE packed next to each head's output in the KVP all-gather


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    memory_bytes_per_s: float
    matmul_flops_per_s: float  # dense matmul peak in the serving dtype
    attention_flops_per_s: float  # fused attention peak
    link_bytes_per_s: float  # per-device collective bandwidth
    link_latency_s: float  # per collective
    step_overhead_s: float  # per step: host scheduling, launches, sampling
    layer_overhead_s: float  # per layer: kernel launches not hidden by the GPU's work
    memory_capacity_bytes: float = 0.0  # device memory (planning: do weights and KV fit)
    num_sms: int = 0  # streaming multiprocessors (the prefill lane's splits); 0: none (CPU)


H200 = DeviceSpec(
    name="NVIDIA H200",
    memory_bytes_per_s=4.2e12,
    matmul_flops_per_s=800e12,
    attention_flops_per_s=590e12,
    link_bytes_per_s=400e9,  # NVLink 4, per direction, achievable for all-reduce
    link_latency_s=10e-6,
    step_overhead_s=0.8e-3,
    layer_overhead_s=5e-6,
    memory_capacity_bytes=143771 * 2**20,
    num_sms=132,
)
H100 = DeviceSpec(  # SXM: 3.35 TB/s HBM3, 989 TFLOP/s dense bf16 peak (about 700 achievable)
    name="NVIDIA H100",
    memory_bytes_per_s=3.35e12,
    matmul_flops_per_s=700e12,
    attention_flops_per_s=500e12,
    link_bytes_per_s=400e9,  # NVLink 4, as on the H200
    link_latency_s=10e-6,
    step_overhead_s=0.8e-3,
    layer_overhead_s=5e-6,
    memory_capacity_bytes=81559 * 2**20,
    num_sms=132,
)
CPU = DeviceSpec(
    name="cpu",
    memory_bytes_per_s=20e9,
    matmul_flops_per_s=100e9,
    attention_flops_per_s=50e9,
    link_bytes_per_s=5e9,  # gloo over loopback
    link_latency_s=50e-6,
    step_overhead_s=2e-3,
    layer_overhead_s=50e-6,
    memory_capacity_bytes=16 * 2**30,
)
DEVICE_SPECS: dict[str, DeviceSpec] = {"cpu": CPU, "h200": H200, "h100": H100}


def device_spec_for(device_name: str) -> DeviceSpec:
    """The spec whose key appears in `device_name` ("NVIDIA H200" -> H200); H200 numbers for an
    unknown GPU (the roofline is only a fallback until a profile is measured), CPU for "cpu"."""
    low = device_name.lower()
    for key, spec in DEVICE_SPECS.items():
        if key in low:
            return spec
    return H200


def weights_read_s(shape: ModelShape, tp: int, device: DeviceSpec) -> float:
    """One rank's read of the weights a decode step streams (every layer's, the LM head; the
    embedding only in the rows it looks up) at the device's full bandwidth."""
    params = shape.num_layers * shape.params_per_layer + shape.vocab_size * shape.hidden_size
    return params * shape.dtype_bytes / tp / device.memory_bytes_per_s


def compute_s(shape: ModelShape, tp: int, device: DeviceSpec, load: GroupLoad) -> float:
    """One rank's FLOPs of a one-stage load at the device's peaks on every SM (its compute
    floor): every layer's dense and attention FLOPs, and the LM head's sampled rows."""
    dense_flops, attn_flops = layer_flops(shape, tp, load)
    head_flops = 2 * shape.vocab_size * shape.hidden_size / tp * load.num_sampled
    return (
        shape.num_layers
        * (dense_flops / device.matmul_flops_per_s + attn_flops / device.attention_flops_per_s)
        + head_flops / device.matmul_flops_per_s
    )


def layer_flops(shape: ModelShape, tp: int, load: GroupLoad) -> tuple[float, float]:
    """One layer's (dense, attention) FLOPs of a load on one of tp ranks."""
    pairs = load.chunk_prefix_pairs + load.chunk_causal_pairs + load.decode_kv_tokens
    return (
        2 * shape.params_per_layer / tp * load.num_tokens,
        4 * shape.num_heads / tp * shape.head_dim * pairs,
    )


class RooflineLatencyModel:
    def __init__(self, shape: ModelShape, layout: Layout, device: DeviceSpec) -> None:
        self.shape = shape
        self.layout = layout
        self.device = device
        self.num_stage_layers = -(-shape.num_layers // layout.spp)

    def step_time_s(self, composition: StepComposition) -> float:
        busiest = max((self.stage_time_s(g) for g in composition.groups), default=0.0)
        stage = busiest + self.merge_time_s(composition.num_shared_tokens)
        num_tokens = max((g.num_tokens for g in composition.groups), default=0)
        sp = self.layout.spp
        return sp * stage + (sp - 1) * self.send_time_s(num_tokens)

    def stage_time_s(self, load: GroupLoad) -> float:
        if load.is_empty:
            return 0.0
        s, dev, tp, n_layers = self.shape, self.device, self.layout.tp, self.num_stage_layers
        weight_bytes = s.params_per_layer * s.dtype_bytes / tp
        dense_flops, attn_flops = layer_flops(s, tp, load)
        dense = max(weight_bytes / dev.memory_bytes_per_s, dense_flops / dev.matmul_flops_per_s)
        keys = load.chunk_prefix_tokens + load.decode_kv_tokens + load.num_tokens
        attn_bytes = keys * s.kv_bytes_per_token_per_layer / tp
        attn = max(attn_flops / dev.attention_flops_per_s, attn_bytes / dev.memory_bytes_per_s)
        head_params = s.vocab_size * s.hidden_size / tp
        head = max(
            head_params * s.dtype_bytes / dev.memory_bytes_per_s,
            2 * head_params * load.num_sampled / dev.matmul_flops_per_s,
        )
        allreduce = 0.0
        if tp > 1:
            nbytes = load.num_tokens * s.hidden_size * s.dtype_bytes
            allreduce = 2 * (dev.link_latency_s + 2 * (tp - 1) / tp * nbytes / dev.link_bytes_per_s)
        per_layer = dense + attn + allreduce + dev.layer_overhead_s
        return dev.step_overhead_s + n_layers * per_layer + head

    def merge_time_s(self, num_shared_tokens: int) -> float:
        """The per-layer all-gather of (output, LSE) partials over the KVP group, for one stage."""
        s, kvp = self.shape, self.layout.kvp
        if kvp == 1 or num_shared_tokens == 0:
            return 0.0
        row_bytes = s.num_heads / self.layout.tp * (s.head_dim * s.dtype_bytes + _LSE_BYTES)
        nbytes = (kvp - 1) * num_shared_tokens * row_bytes
        return self.num_stage_layers * (self.device.link_latency_s + nbytes / self.device.link_bytes_per_s)

    def send_time_s(self, num_tokens: int) -> float:
        """One stage-to-stage send of the hidden state (a 1/tp slice per rank)."""
        nbytes = num_tokens * self.shape.hidden_size * self.shape.dtype_bytes / self.layout.tp
        return self.device.link_latency_s + nbytes / self.device.link_bytes_per_s
