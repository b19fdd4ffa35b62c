"""`mnemosyne plan`: every tp x spp x kvp layout for a model, GPU count and context length.

layouts     tp in {1, 2, 4, 8} (one node), dividing the heads (`parallel/validate.py`),
            spp <= layers, tp * spp * kvp <= num_gpus
T           max_tokens_per_kvp_group = ceil(L / kvp), rounded up to the block size
memory      per GPU: weight shard (longest stage) + T tokens of KV (longest stage, this
            rank's KV heads); fits iff <= memory_fraction * GPU memory
TBT         one decode at context L: latency model step time of its composition
            (a query on each of the ceil(L / T) groups, merged) -- it crosses all stages
TTFT        one L-token prompt alone with adaptive chunks (the engine's `PrefillTimeTable`:
            per prefix, the largest chunk whose step time fits the target of a step with no
            decode, `prefill_only_step_s`), pipelined: with spp stages one chunk leaves the
            pipeline per stage time, so
            ttft = T_alone(L) / spp + (spp - 1) / spp * t_last,  t_last = the last chunk's step time
latency     the roofline of the GPU; measured profiles (`--latency-profile`, one per TP
            degree measured): each for the layout it was measured on, and for the layouts of
            the same tp with more stages or KVP groups when it was measured without
            (`latency/transfer.py`); a layout's own profile before a transferred one
best        among layouts meeting both SLOs: the lowest TTFT, then fewer GPUs, then lower TBT;
            none meeting: the fitting layout with the lowest TBT
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from mnemosyne.config import ModelConfig, ParallelConfig
from mnemosyne.config_policy import PolicyConfig
from mnemosyne.engine.args import DEFAULT_BLOCK_SIZE, kv_bytes_per_token_per_device, weight_bytes_per_device
from mnemosyne.engine.prefill_time import PrefillTimeTable, lone_chunk_composition
from mnemosyne.errors import ConfigError
from mnemosyne.latency.model import LatencyModel
from mnemosyne.latency.profile_store import LatencyProfile
from mnemosyne.latency.roofline import DeviceSpec, RooflineLatencyModel
from mnemosyne.latency.shape import Layout, ModelShape
from mnemosyne.latency.transfer import TransferredLatencyModel, model_for_layout
from mnemosyne.parallel.validate import check_layout
from mnemosyne.simulator.setup import GPU_MEMORY_FRACTION

GPUS_PER_NODE = 8
MAX_CHUNK_TOKENS = 8192  # the reference engine's largest adaptive chunk
TTFT_RESOLUTION_POINTS = 512  # prefill table points over the context (at least 2048 tokens apart)


@dataclass(frozen=True)
class LayoutPlan:
    tp: int
    spp: int
    kvp: int
    num_gpus: int
    max_tokens_per_kvp_group: int
    fits: bool
    weight_gib_per_gpu: float
    kv_gib_per_gpu: float
    ttft_s: float
    tbt_s: float
    meets_slo: bool
    latency_model: str = "roofline"  # roofline | profile | profile (transferred)


def candidate_layouts(model_cfg: ModelConfig, num_gpus: int) -> list[Layout]:
    out = []
    for tp in (1, 2, 4, 8):
        for spp in range(1, num_gpus // tp + 1):
            for kvp in range(1, num_gpus // (tp * spp) + 1):
                if tp > GPUS_PER_NODE:
                    continue
                try:
                    check_layout(model_cfg, ParallelConfig(tp=tp, spp=spp, kvp=kvp), num_gpus)
                except ConfigError:
                    continue
                out.append(Layout(tp, spp, kvp))
    return out


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def plan_layout(
    model_cfg: ModelConfig,
    layout: Layout,
    context_len: int,
    spec: DeviceSpec,
    tbt_slo_s: float,
    ttft_slo_s: float | None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    latency_model: LatencyModel | None = None,
    prefill_only_step_s: float = PolicyConfig.prefill_only_step_s,
) -> LayoutPlan:
    parallel = ParallelConfig(tp=layout.tp, spp=layout.spp, kvp=layout.kvp)
    t = _round_up(-(-context_len // layout.kvp), block_size)
    weight_bytes = weight_bytes_per_device(model_cfg, parallel)
    kv_bytes = t * kv_bytes_per_token_per_device(model_cfg, parallel)
    fits = weight_bytes + kv_bytes <= GPU_MEMORY_FRACTION * spec.memory_capacity_bytes
    model = latency_model or RooflineLatencyModel(ModelShape.from_model_config(model_cfg), layout, spec)
    group_t = t if layout.kvp > 1 else None
    tbt = model.step_time_s(lone_chunk_composition(layout.kvp, group_t, context_len, 1))
    table = PrefillTimeTable(
        model,
        prefill_only_step_s,
        num_kvp_groups=layout.kvp,
        max_tokens_per_kvp_group=group_t,
        max_chunk_tokens=MAX_CHUNK_TOKENS,
        resolution_tokens=max(2048, _round_up(context_len // TTFT_RESOLUTION_POINTS, 32)),
    )
    alone_s = table.time_s(context_len)
    last_s = table.last_chunk_s(context_len)
    ttft = alone_s / layout.spp + (layout.spp - 1) / layout.spp * last_s
    meets = fits and tbt <= tbt_slo_s and (ttft_slo_s is None or ttft <= ttft_slo_s)
    return LayoutPlan(
        tp=layout.tp,
        spp=layout.spp,
        kvp=layout.kvp,
        num_gpus=layout.tp * layout.spp * layout.kvp,
        max_tokens_per_kvp_group=t,
        fits=fits,
        weight_gib_per_gpu=weight_bytes / 2**30,
        kv_gib_per_gpu=kv_bytes / 2**30,
        ttft_s=ttft,
        tbt_s=tbt,
        meets_slo=meets,
        latency_model=_source(latency_model),
    )


def _source(model: LatencyModel | None) -> str:
    if model is None:
        return "roofline"
    return "profile (transferred)" if isinstance(model, TransferredLatencyModel) else "profile"


def choose_best(
    plans: list[LayoutPlan], tbt_slo_s: float, ttft_slo_s: float | None
) -> tuple[LayoutPlan | None, str]:
    meeting = [p for p in plans if p.meets_slo]
    if meeting:
        best = min(meeting, key=lambda p: (p.ttft_s, p.num_gpus, p.tbt_s))
        slo = f"TBT <= {tbt_slo_s * 1e3:g} ms" + (f" and TTFT <= {ttft_slo_s:g} s" if ttft_slo_s else "")
        return best, (
            f"meets {slo} ({len(meeting)} of {len(plans)} layouts do); lowest predicted TTFT "
            f"({best.ttft_s:.1f} s) among them, TBT {best.tbt_s * 1e3:.1f} ms"
        )
    fitting = [p for p in plans if p.fits]
    if fitting:
        best = min(fitting, key=lambda p: (p.tbt_s, p.ttft_s, p.num_gpus))
        return best, (
            f"no layout meets the SLOs; this one fits in memory and has the lowest predicted TBT "
            f"({best.tbt_s * 1e3:.1f} ms, TTFT {best.ttft_s:.1f} s)"
        )
    return None, "no layout fits the weights and the KV of one context in GPU memory"


def profiled_model_for(
    profiles: Sequence[LatencyProfile], shape: ModelShape, layout: Layout, spec: DeviceSpec
) -> LatencyModel | None:
    """The measured model for `layout`: a profile of this shape measured on `layout` itself,
    else one that transfers to it (`model_for_layout`); None: the roofline."""
    models = [model_for_layout(p.model, shape, layout, spec) for p in profiles if p.key.shape == shape]
    models = [m for m in models if m is not None]
    own = [m for m in models if not isinstance(m, TransferredLatencyModel)]
    return (own or models or [None])[0]


def plan(
    model_cfg: ModelConfig,
    num_gpus: int,
    context_len: int,
    spec: DeviceSpec,
    tbt_slo_s: float,
    ttft_slo_s: float | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    profiles: Sequence[LatencyProfile] = (),
    prefill_only_step_s: float = PolicyConfig.prefill_only_step_s,
) -> dict:
    if num_gpus < 1 or context_len < 2:
        raise ConfigError(f"need num_gpus >= 1 and context_len >= 2, got {num_gpus}, {context_len}")
    shape = ModelShape.from_model_config(model_cfg)
    plans = []
    for layout in candidate_layouts(model_cfg, num_gpus):
        model = profiled_model_for(profiles, shape, layout, spec)
        plans.append(
            plan_layout(
                model_cfg,
                layout,
                context_len,
                spec,
                tbt_slo_s,
                ttft_slo_s,
                block_size,
                model,
                prefill_only_step_s,
            )
        )
    best, reason = choose_best(plans, tbt_slo_s, ttft_slo_s)
    return {
        "gpu": spec.name,
        "num_gpus": num_gpus,
        "context_len": context_len,
        "tbt_slo_s": tbt_slo_s,
        "ttft_slo_s": ttft_slo_s,
        "latency_model": f"roofline {spec.name}"
        + "".join(f"; profile measured at {p.key.layout} (tp {p.key.layout.tp} layouts)" for p in profiles),
        "layouts": [asdict(p) for p in plans],
        "best": (asdict(best) | {"reason": reason}) if best else {"reason": reason},
    }


def format_table(result: dict) -> str:
    head = f"{'tp':>3} {'spp':>4} {'kvp':>4} {'gpus':>5} {'T/group':>10} {'fits':>5} {'W GiB':>7} " \
           f"{'KV GiB':>8} {'TTFT s':>10} {'TBT ms':>9} {'SLO':>4}"  # fmt: skip
    lines = [
        f"{result['context_len']} tokens on {result['num_gpus']} x {result['gpu']} "
        f"(TBT SLO {result['tbt_slo_s'] * 1e3:g} ms"
        + (f", TTFT SLO {result['ttft_slo_s']:g} s" if result["ttft_slo_s"] else "")
        + f"; {result['latency_model']})",
        head,
    ]
    for p in result["layouts"]:
        lines.append(
            f"{p['tp']:>3} {p['spp']:>4} {p['kvp']:>4} {p['num_gpus']:>5} {p['max_tokens_per_kvp_group']:>10} "
            f"{'yes' if p['fits'] else 'no':>5} {p['weight_gib_per_gpu']:>7.1f} {p['kv_gib_per_gpu']:>8.1f} "
            f"{p['ttft_s']:>10.2f} {p['tbt_s'] * 1e3:>9.2f} {'yes' if p['meets_slo'] else 'no':>4}"
        )
    b = result["best"]
    if "tp" in b:
        lines.append(f"best: tp={b['tp']} spp={b['spp']} kvp={b['kvp']} "
                     f"max_tokens_per_kvp_group={b['max_tokens_per_kvp_group']}: {b['reason']}")  # fmt: skip
    else:
        lines.append(f"best: none: {b['reason']}")
    return "\n".join(lines)
