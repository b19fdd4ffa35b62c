"""The best TTFT a long prompt can reach when every step must stay within the TBT target.

With D requests decoding alongside, every step carries their D tokens, so each step is one
token gap of theirs and must take at most the target. The fastest prefill under that rule
takes, at every step, the largest chunk that fits (step time grows with the chunk), so the
bound integrates over the prompt, one step at a time::

    P = 0, K = decode context, t = 0
    while P < N:
        c  = the largest c in [1, N - P] with step_time(D decodes at K + chunk c at prefix P) <= target
             (binary search on the latency model); when not even 1 token fits, the target cannot
             be met at this prefix: c = overshoot_chunk_tokens (the engine's min_chunk_tokens),
             the step counted over target
        t += step_time(...);  P += c;  K += 1 if the decodes grow (each step adds their token)
    TTFT bound = t     (one device, no pipeline; host time only as far as the model holds it)

Beside it: the prompt's FLOPs floor (linear layers at the matmul peak, attention at the
attention peak: what "unconstrained" means in the benchmarks) and the same model's time for
the prompt with the decodes but no target (max_chunk_tokens per step). Times in seconds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from mnemosyne.latency.composition import GroupLoad, StepComposition
from mnemosyne.latency.model import LatencyModel
from mnemosyne.latency.roofline import DeviceSpec
from mnemosyne.latency.shape import ModelShape

NUM_CHECKPOINTS = 8  # (prefix, chunk, step time) samples reported along the prompt


@dataclass(frozen=True)
class TTFTBound:
    prompt_tokens: int
    num_decodes: int
    decode_context_tokens: int
    tbt_slo_s: float
    ttft_s: float  # the bound: every step within tbt_slo_s (but those over target below)
    num_steps: int
    num_steps_over_target: int  # steps where even a 1-token chunk exceeds the target
    first_over_target_prefix_tokens: int | None  # None: the target holds over the whole prompt
    max_step_s: float
    unconstrained_s: float  # same model and decodes, max_chunk_tokens per step, no target
    checkpoints: list[dict] = field(default_factory=list)  # prefix_tokens, chunk_tokens, step_s

    def to_dict(self) -> dict:
        return asdict(self)


def decode_load(num_decodes: int, context_tokens: int) -> GroupLoad:
    load = GroupLoad()
    for _ in range(num_decodes):
        load = load.plus_decode(context_tokens + 1)  # its prefix plus its own new key
    return load


def step_s(model: LatencyModel, decodes: GroupLoad, prefix: int, num_tokens: int, last: bool) -> float:
    return model.step_time_s(StepComposition.single(decodes.plus_chunk(num_tokens, prefix, sample=last)))


def largest_fitting_chunk(model: LatencyModel, decodes: GroupLoad, prefix: int, cap: int, total: int,
                          target_s: float) -> int:  # fmt: skip
    """The largest c in [1, cap] whose step fits target_s; 0 when not even 1 token does."""
    lo, hi = 0, cap
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if step_s(model, decodes, prefix, mid, prefix + mid == total) <= target_s:
            lo = mid
        else:
            hi = mid - 1
    return lo


def best_ttft_under_tbt(
    model: LatencyModel,
    prompt_tokens: int,
    num_decodes: int,
    decode_context_tokens: int,
    tbt_slo_s: float,
    decodes_grow: bool = True,
    max_chunk_tokens: int = 8192,
    overshoot_chunk_tokens: int = 32,
) -> TTFTBound:
    if prompt_tokens < 1 or num_decodes < 0 or decode_context_tokens < 0 or tbt_slo_s <= 0:
        raise ValueError("need prompt_tokens >= 1, num_decodes >= 0, decode_context_tokens >= 0, tbt_slo_s > 0")
    every = max(1, prompt_tokens // NUM_CHECKPOINTS)
    prefix, context, t, steps, over, max_s = 0, decode_context_tokens, 0.0, 0, 0, 0.0
    first_over: int | None = None
    checkpoints: list[dict] = []
    next_checkpoint = 0
    while prefix < prompt_tokens:
        decodes = decode_load(num_decodes, context)
        cap = prompt_tokens - prefix
        c = largest_fitting_chunk(model, decodes, prefix, cap, prompt_tokens, tbt_slo_s)
        if c == 0:
            c, over = min(overshoot_chunk_tokens, cap), over + 1
            first_over = prefix if first_over is None else first_over
        s = step_s(model, decodes, prefix, c, prefix + c == prompt_tokens)
        if prefix >= next_checkpoint:
            checkpoints.append({"prefix_tokens": prefix, "chunk_tokens": c, "step_s": s})
            next_checkpoint = (prefix // every + 1) * every
        t, prefix, steps, max_s = t + s, prefix + c, steps + 1, max(max_s, s)
        context += int(decodes_grow)
    return TTFTBound(
        prompt_tokens=prompt_tokens,
        num_decodes=num_decodes,
        decode_context_tokens=decode_context_tokens,
        tbt_slo_s=tbt_slo_s,
        ttft_s=t,
        num_steps=steps,
        num_steps_over_target=over,
        first_over_target_prefix_tokens=first_over,
        max_step_s=max_s,
        unconstrained_s=unconstrained_ttft_s(model, prompt_tokens, num_decodes, decode_context_tokens,
                                             decodes_grow, max_chunk_tokens),  # fmt: skip
        checkpoints=checkpoints,
    )


def unconstrained_ttft_s(model: LatencyModel, prompt_tokens: int, num_decodes: int, decode_context_tokens: int,
                         decodes_grow: bool = True, max_chunk_tokens: int = 8192) -> float:  # fmt: skip
    t, context = 0.0, decode_context_tokens
    for prefix in range(0, prompt_tokens, max_chunk_tokens):
        c = min(max_chunk_tokens, prompt_tokens - prefix)
        t += step_s(model, decode_load(num_decodes, context), prefix, c, prefix + c == prompt_tokens)
        context += int(decodes_grow)
    return t


def prompt_flops_floor_s(shape: ModelShape, prompt_tokens: int, spec: DeviceSpec) -> float:
    """The prompt's FLOPs at peak: every linear layer (LM head included) at the matmul peak,
    causal attention (n (n + 1) / 2 query-key pairs per layer) at the attention peak."""
    n = prompt_tokens
    linear_params = shape.num_layers * shape.params_per_layer + shape.vocab_size * shape.hidden_size
    attn_flops = 4 * shape.num_heads * shape.head_dim * shape.num_layers * n * (n + 1) / 2
    return 2 * linear_params * n / spec.matmul_flops_per_s + attn_flops / spec.attention_flops_per_s


def slo_for_ttft_s(model: LatencyModel, prompt_tokens: int, num_decodes: int, decode_context_tokens: int,
                   ttft_s: float, lo_s: float, hi_s: float, tolerance_s: float = 1e-3) -> float | None:  # fmt: skip
    """The smallest TBT target (within tolerance_s, searched in [lo_s, hi_s]) that holds over the
    whole prompt with a bound of at most ttft_s; None when even hi_s does not."""

    def ok(target_s: float) -> bool:
        bound = best_ttft_under_tbt(model, prompt_tokens, num_decodes, decode_context_tokens, target_s)
        return bound.num_steps_over_target == 0 and bound.ttft_s <= ttft_s

    if not ok(hi_s):
        return None
    while hi_s - lo_s > tolerance_s:
        mid = (lo_s + hi_s) / 2
        lo_s, hi_s = (lo_s, mid) if ok(mid) else (mid, hi_s)
    return hi_s
