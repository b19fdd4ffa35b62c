"""A latency model fitted to measured steps: roofline-shaped terms, non-negative coefficients.

Per KVP group, with c = chunk size and P = prefix keys of each chunk (see `composition.py`)::

    t_group = a                                      fixed cost of a non-empty step
            + b * num_tokens + b' * max(num_tokens, knee)   dense layers: weight-bound up to the
                                                     knee (ridge point of the device), FLOP-bound past it
            + g * sum P + d * sum c*P + e * sum c(c+1)/2 + k * num_chunks   chunk attention
            + u * sum decode keys + v * max decode keys + w * num_decodes   decode attention
            + s * num_sampled                        LM head rows
    step    = max over groups of t_group + m * shared tokens + m0 * [any shared]   (KVP merge)

For one chunk this is the issue's t = a + b*c + g*P + d*c*P + e*c^2. The fit minimises
the relative error (rows weighted by 1 / measured), with every coefficient >= 0 so
predictions grow with work, which the chunk-size binary search relies on.
Coefficients are seconds per unit of their feature.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mnemosyne.latency.composition import GroupLoad, StepComposition
from mnemosyne.latency.shape import Layout

GROUP_FEATURES = (
    "one",
    "tokens",
    "tokens_past_knee",
    "prefix_tokens",
    "prefix_pairs",
    "causal_pairs",
    "chunks",
    "decode_kv_tokens",
    "max_decode_kv_tokens",
    "decodes",
    "sampled",
)
STEP_FEATURES = ("shared_tokens", "any_shared")


def group_features(load: GroupLoad, knee_tokens: int) -> list[float]:
    if load.is_empty:
        return [0.0] * len(GROUP_FEATURES)
    return [
        1.0,
        float(load.num_tokens),
        float(max(load.num_tokens, knee_tokens)),
        float(load.chunk_prefix_tokens),
        float(load.chunk_prefix_pairs),
        float(load.chunk_causal_pairs),
        float(load.num_chunks),
        float(load.decode_kv_tokens),
        float(load.max_decode_kv_tokens),
        float(load.num_decodes),
        float(load.num_sampled),
    ]


def step_features(composition: StepComposition) -> list[float]:
    n = composition.num_shared_tokens
    return [float(n), float(n > 0)]


@dataclass(frozen=True)
class FittedLatencyModel:
    layout: Layout
    knee_tokens: int
    group_coefficients_s: tuple[float, ...]  # one per GROUP_FEATURES entry
    step_coefficients_s: tuple[float, ...]  # one per STEP_FEATURES entry

    def group_time_s(self, load: GroupLoad) -> float:
        phi = group_features(load, self.knee_tokens)
        return sum(c * f for c, f in zip(self.group_coefficients_s, phi, strict=True))

    def step_time_s(self, composition: StepComposition) -> float:
        busiest = max((self.group_time_s(g) for g in composition.groups), default=0.0)
        phi = step_features(composition)
        return busiest + sum(c * f for c, f in zip(self.step_coefficients_s, phi, strict=True))

    def to_dict(self) -> dict:
        return {
            "knee_tokens": self.knee_tokens,
            "group_features": dict(zip(GROUP_FEATURES, self.group_coefficients_s, strict=True)),
            "step_features": dict(zip(STEP_FEATURES, self.step_coefficients_s, strict=True)),
        }

    @classmethod
    def from_dict(cls, layout: Layout, d: dict) -> FittedLatencyModel:
        g, s = d["group_features"], d["step_features"]
        return cls(
            layout=layout,
            knee_tokens=int(d["knee_tokens"]),
            group_coefficients_s=tuple(float(g[name]) for name in GROUP_FEATURES),
            step_coefficients_s=tuple(float(s[name]) for name in STEP_FEATURES),
        )


def fit_latency_model(
    samples: Sequence[tuple[StepComposition, float]],
    layout: Layout,
    knee_tokens: int,
    busiest_group: Sequence[int] | None = None,
) -> FittedLatencyModel:
    """Weighted non-negative least squares over (composition, measured seconds) pairs.

    `busiest_group[i]` names the group whose load sets sample i's time (default: the one
    with the most query tokens); only that group's features enter the row.
    """
    import numpy as np

    if not samples:
        raise ValueError("no samples to fit")
    rows, targets = [], []
    for i, (comp, measured_s) in enumerate(samples):
        if measured_s <= 0:
            raise ValueError(f"sample {i}: measured time must be positive, got {measured_s}")
        g = busiest_group[i] if busiest_group is not None else _most_tokens(comp)
        phi = group_features(comp.groups[g], knee_tokens) + step_features(comp)
        rows.append([f / measured_s for f in phi])
        targets.append(1.0)
    a = np.asarray(rows, dtype=np.float64)
    b = np.asarray(targets, dtype=np.float64)
    scale = np.maximum(np.abs(a).max(axis=0), 1e-30)  # columns of very different magnitudes
    coef = _nnls(a / scale, b) / scale
    n_group = len(GROUP_FEATURES)
    return FittedLatencyModel(
        layout=layout,
        knee_tokens=knee_tokens,
        group_coefficients_s=tuple(float(c) for c in coef[:n_group]),
        step_coefficients_s=tuple(float(c) for c in coef[n_group:]),
    )


def _most_tokens(comp: StepComposition) -> int:
    return max(range(len(comp.groups)), key=lambda g: comp.groups[g].num_tokens)


def _nnls(a, b):  # numpy arrays -> numpy array
    try:
        from scipy.optimize import nnls
    except ImportError:  # plain least squares, negatives clipped
        import numpy as np

        return np.clip(np.linalg.lstsq(a, b, rcond=None)[0], 0.0, None)
    return nnls(a, b, maxiter=50 * a.shape[1])[0]
