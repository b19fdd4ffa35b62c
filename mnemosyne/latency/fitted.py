"""A latency model fitted to measured steps: roofline-shaped terms, non-negative coefficients.

Per KVP group, with c = chunk size and P = prefix keys of each chunk (see `composition.py`)::

    t_group = a                                      fixed cost of a non-empty step
            + b * num_tokens + b' * max(num_tokens, knee)   dense layers: weight-bound up to the
                                                     knee (ridge point of the device), FLOP-bound past it
            + g * sum P + d * sum c'*P + e * sum c(c+1)/2 + k * num_chunks
                                                     chunk attention
            + r * L * sum keys * per_key(c')         chunk attention per key, as the kernels scale with c
            + u * sum decode keys + v * max decode keys + w * num_decodes   decode attention
            + s * num_sampled                        LM head rows
    step    = max over groups of t_group + m * shared tokens + m0 * [any shared]   (KVP merge)

For one chunk this is the issue's t = a + b*c + g*P + d*c*P + e*c^2. That polynomial cannot
follow the kernels' shape in c: the backend runs each chunk on the cheaper of two paths, and
a path's seconds per key are flat for small c (bandwidth-bound) and grow with c past it
(`latency/kernel_cost.py`, measured per chunk length). So where the profile knows the
backend's cost table (`ChunkAttentionCost`: the table, L layers, the per-GPU heads, the
cache's page-tile choice), kernel_chunk_key_s = L * sum over chunks of keys * per_key(c),
per_key(c) the lower of the two paths' (keys = P + own keys), is one more feature; r is
about 1 when the table is right (0.90 on the H200 quick profile). The table's fixed costs
are left to a and k: they are measured after long prefixes and overstate short ones.
Profiles without the table (format 1, CPU) have r = 0.
c' = the chunk padded to whole query tiles of the Triton path (`ChunkAttentionCost.padded_tokens`,
the table's tile; c' = c without a table): each row of a tile runs its whole key loop, so on an
H200 48 tokens after 240K keys cost what 64 do, and a model linear in c under-predicted chunks
of 48 / 80 / 112 tokens by 13-18% (benchmarks/results/session20_h200_2026-12-01/).

The fit minimises the relative error (rows weighted by 1 / measured), with every coefficient
>= 0 so predictions grow with work, which the chunk-size binary search relies on.
Coefficients are seconds per unit of their feature.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mnemosyne.kernels.host_math import padded_chunk_tokens
from mnemosyne.latency.composition import GroupLoad, StepComposition
from mnemosyne.latency.kernel_cost import ChunkCostModel, ChunkPath
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
    "kernel_chunk_key_s",
)
STEP_FEATURES = ("shared_tokens", "any_shared")
OPTIONAL_FEATURES = frozenset({"kernel_chunk_key_s"})  # absent from format-1 profiles: 0


@dataclass(frozen=True)
class ChunkAttentionCost:
    """The attention backend's measured per-key chunk costs (`cost_model`, the table
    `KernelBackend` picks paths by), for a model's layers and per-GPU heads."""

    cost_model: ChunkCostModel
    num_layers: int
    num_heads: int  # per GPU
    head_dim: int
    page_tiles: bool  # the cache's block size allows the page-aligned Triton kernel
    tile_tokens: int = 1  # query tokens per tile of the Triton path (`kernels/host_math.py`); 1: none

    def padded_tokens(self, num_tokens: int) -> int:
        """The query rows a chunk of num_tokens costs on the Triton path: whole tiles (each
        row of a tile runs its key loop). Per chunk: the backend sizes one step's tiles by its
        longest chunk, which this leaves out (a short chunk beside a long one is a whole tile)."""
        return padded_chunk_tokens(num_tokens, self.tile_tokens)

    def padding_pairs(self, load: GroupLoad) -> int:
        """sum over chunks of (padded - c) x (keys - c): the prefix pairs the tiles' padding
        rows add to chunk_prefix_pairs, so that a chunk counts padded x P of them. keys - c is
        P where the group owns the chunk (keys = P + c); where it does not (keys = P) it is c
        short per padding row, against a prefix that is a whole KVP piece there. Chunks the
        backend sends to cuDNN are counted padded too (under a tile's rows more, a few percent
        of a chunk long enough to take that path): the term stays monotone in c, as the
        chunk-size search needs (it would drop where a chunk switches path, and padded x keys
        would dip inside a tile)."""
        return sum((self.padded_tokens(c) - c) * max(num_keys - c, 0) for c, num_keys in load.chunk_shapes)

    def key_seconds(self, load: GroupLoad) -> float:
        """kernel_chunk_key_s: sum over chunks of keys * the lower of the two paths' per-key
        cost at that chunk length, all layers. Past a few thousand keys the backend runs the
        path that is cheaper per key, so this is its per-key time; the lower envelope (not the
        path `cheaper` picks by fixed + per-key) keeps the feature non-decreasing in c and in
        the keys, which the chunk-size binary search relies on (the picked path's per-key cost
        drops where a long chunk switches to cuDNN). The Triton path's cost is at the chunk's
        padded length (`padded_tokens`)."""
        m, h, d = self.cost_model, self.num_heads, self.head_dim
        per_layer = 0.0
        triton, cudnn = m.path_cost(ChunkPath.TRITON_SPLITKV, self.page_tiles), m.path_cost(ChunkPath.CUDNN)
        for c, num_keys in load.chunk_shapes:
            c_tiles = self.padded_tokens(c)
            per_key_triton = triton.at(c_tiles)[1] * m.path_shape_factor(ChunkPath.TRITON_SPLITKV, c_tiles, h, d)
            per_key_cudnn = cudnn.at(c)[1] * m.path_shape_factor(ChunkPath.CUDNN, c, h, d)
            per_layer += num_keys * min(per_key_triton, per_key_cudnn)
        return self.num_layers * per_layer

    def to_dict(self) -> dict:
        return {"cost_model": self.cost_model.to_dict(), "num_layers": self.num_layers,
                "num_heads": self.num_heads, "head_dim": self.head_dim, "page_tiles": self.page_tiles,
                "tile_tokens": self.tile_tokens}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict, default_tile_tokens: int = 1) -> ChunkAttentionCost:
        """default_tile_tokens: for a record written before tiles were (`load_profile` gives
        the one its key's shape implies)."""
        return cls(ChunkCostModel.from_dict(d["cost_model"]), int(d["num_layers"]), int(d["num_heads"]),
                   int(d["head_dim"]), bool(d["page_tiles"]), int(d.get("tile_tokens", default_tile_tokens)))  # fmt: skip


def group_features(load: GroupLoad, knee_tokens: int, attention: ChunkAttentionCost | None = None) -> list[float]:
    if load.is_empty:
        return [0.0] * len(GROUP_FEATURES)
    return [
        1.0,
        float(load.num_tokens),
        float(max(load.num_tokens, knee_tokens)),
        float(load.chunk_prefix_tokens),
        float(load.chunk_prefix_pairs + (attention.padding_pairs(load) if attention is not None else 0)),
        float(load.chunk_causal_pairs),
        float(load.num_chunks),
        float(load.decode_kv_tokens),
        float(load.max_decode_kv_tokens),
        float(load.num_decodes),
        float(load.num_sampled),
        attention.key_seconds(load) if attention is not None and load.chunk_shapes else 0.0,
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
    chunk_attention: ChunkAttentionCost | None = None  # None: kernel_chunk_key_s is 0

    def group_time_s(self, load: GroupLoad) -> float:
        phi = group_features(load, self.knee_tokens, self.chunk_attention)
        return sum(c * f for c, f in zip(self.group_coefficients_s, phi, strict=True))

    def step_time_s(self, composition: StepComposition) -> float:
        busiest = max((self.group_time_s(g) for g in composition.groups), default=0.0)
        phi = step_features(composition)
        return busiest + sum(c * f for c, f in zip(self.step_coefficients_s, phi, strict=True))

    def to_dict(self) -> dict:
        d = {
            "knee_tokens": self.knee_tokens,
            "group_features": dict(zip(GROUP_FEATURES, self.group_coefficients_s, strict=True)),
            "step_features": dict(zip(STEP_FEATURES, self.step_coefficients_s, strict=True)),
        }
        if self.chunk_attention is not None:
            d["chunk_attention"] = self.chunk_attention.to_dict()
        return d

    @classmethod
    def from_dict(cls, layout: Layout, d: dict, default_tile_tokens: int = 1) -> FittedLatencyModel:
        """Format 1 (no kernel feature) and 2. Raises KeyError/ValueError naming what is wrong.
        default_tile_tokens: the chunk kernels' tile where the record holds none."""
        g, s = d["group_features"], d["step_features"]
        unknown = set(g) - set(GROUP_FEATURES) | set(s) - set(STEP_FEATURES)
        if unknown:
            raise ValueError(f"unknown latency-model features {sorted(unknown)}")
        missing = [n for n in GROUP_FEATURES if n not in g and n not in OPTIONAL_FEATURES]
        if missing:
            raise KeyError(f"group features {missing}")
        attention = d.get("chunk_attention")
        model = cls(
            layout=layout,
            knee_tokens=int(d["knee_tokens"]),
            group_coefficients_s=tuple(float(g.get(name, 0.0)) for name in GROUP_FEATURES),
            step_coefficients_s=tuple(float(s[name]) for name in STEP_FEATURES),
            chunk_attention=None if attention is None else ChunkAttentionCost.from_dict(attention, default_tile_tokens),
        )
        if model.chunk_attention is None and g.get("kernel_chunk_key_s", 0.0):
            raise ValueError("kernel_chunk_key_s has a coefficient but there is no chunk_attention cost table")
        return model


def fit_latency_model(
    samples: Sequence[tuple[StepComposition, float]],
    layout: Layout,
    knee_tokens: int,
    busiest_group: Sequence[int] | None = None,
    chunk_attention: ChunkAttentionCost | None = None,
    excluded: frozenset[str] = frozenset(),
) -> FittedLatencyModel:
    """Weighted non-negative least squares over (composition, measured seconds) pairs.

    `busiest_group[i]` names the group whose load sets sample i's time (default: the one
    with the most query tokens); only that group's features enter the row. `excluded`
    features keep coefficient 0 (`benchmarks/refit_latency_profile.py` compares feature sets).
    """
    import numpy as np

    if not samples:
        raise ValueError("no samples to fit")
    rows, targets = [], []
    for i, (comp, measured_s) in enumerate(samples):
        if measured_s <= 0:
            raise ValueError(f"sample {i}: measured time must be positive, got {measured_s}")
        g = busiest_group[i] if busiest_group is not None else _most_tokens(comp)
        phi = group_features(comp.groups[g], knee_tokens, chunk_attention) + step_features(comp)
        rows.append([f / measured_s for f in phi])
        targets.append(1.0)
    names = GROUP_FEATURES + STEP_FEATURES
    unknown = excluded - set(names)
    if unknown:
        raise ValueError(f"cannot exclude unknown features {sorted(unknown)}")
    kept = [i for i, name in enumerate(names) if name not in excluded]
    a = np.asarray(rows, dtype=np.float64)[:, kept]
    b = np.asarray(targets, dtype=np.float64)
    scale = np.maximum(np.abs(a).max(axis=0), 1e-30)  # columns of very different magnitudes
    coef = np.zeros(len(names))
    coef[kept] = _nnls(a / scale, b) / scale
    n_group = len(GROUP_FEATURES)
    return FittedLatencyModel(
        layout=layout,
        knee_tokens=knee_tokens,
        group_coefficients_s=tuple(float(c) for c in coef[:n_group]),
        step_coefficients_s=tuple(float(c) for c in coef[n_group:]),
        chunk_attention=chunk_attention,
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
