"""The Llama family: Llama 2/3/3.1/3.2, Mistral, Qwen2 (qkv bias) and Qwen3 (q/k RMSNorm).

They differ only in flags of `ModelConfig` (qkv_bias, qk_norm, sliding_window,
rope scaling, tied embeddings), so one implementation serves them all. Inputs are
flat: all tokens of the batch packed along dim 0, with their global positions.

Under the 3D layout (see `mnemosyne/parallel/groups.py`) one instance is one rank's
part of the model:

    stage s (spp_rank) builds decoder layers stage_layers(num_layers, spp, s) only;
    the embedding lives on the first stage, the final norm and LM head on the last;
    every linear is split over the TP group (num_heads / tp query heads per rank,
    KV heads split or replicated, see `layers/linear.py`); PagedAttention merges
    partials over the KVP group.

    stage 0:       input_ids ─> embed ─> layers[a0:b0) ─> residual stream ──┐
    stage 1:                 ┌───────────────────────────────────────────────┘
                             └─> layers[a1:b1) ─> ... ─> last stage: norm ─> hidden ─> compute_logits
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial

import torch
from torch import nn

from mnemosyne.config import ModelConfig
from mnemosyne.layers.activation import silu_and_mul
from mnemosyne.layers.attention.backend import AttentionBackend
from mnemosyne.layers.attention.layer import PagedAttention
from mnemosyne.layers.attention.metadata import AttentionMetadata
from mnemosyne.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    num_kv_heads_per_rank,
)
from mnemosyne.layers.norm import RMSNorm
from mnemosyne.layers.rotary import RotaryEmbedding
from mnemosyne.layers.vocab_parallel import ParallelLMHead, VocabParallelEmbedding
from mnemosyne.parallel.groups import GroupHandle, ProcessGroups, stage_layers

KVCache = tuple[torch.Tensor, torch.Tensor]
WeightLoader = Callable[[torch.Tensor], None]


def _replicated(param: nn.Parameter) -> WeightLoader:
    """Loader of a parameter every rank holds whole (norms)."""

    def load(tensor: torch.Tensor) -> None:
        if tensor.shape != param.shape:
            raise ValueError(f"checkpoint shape {tuple(tensor.shape)} != {tuple(param.shape)}")
        param.data.copy_(tensor)

    return load


class LlamaAttention(nn.Module):
    def __init__(
        self, cfg: ModelConfig, backend: AttentionBackend, tp_group: GroupHandle, kvp_handle: GroupHandle
    ) -> None:
        super().__init__()
        self.qkv_proj = QKVParallelLinear(
            cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.qkv_bias, cfg.dtype, tp_group
        )
        self.num_heads = self.qkv_proj.num_local_heads  # on this TP rank
        self.num_kv_heads = self.qkv_proj.num_local_kv_heads  # on this TP rank
        self.head_dim = cfg.head_dim
        q_size = cfg.num_heads * cfg.head_dim
        self.o_proj = RowParallelLinear(q_size, cfg.hidden_size, cfg.o_bias, cfg.dtype, tp_group)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, cfg.dtype) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, cfg.dtype) if cfg.qk_norm else None
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.attn = PagedAttention(
            self.num_heads, self.num_kv_heads, cfg.head_dim, backend, cfg.sliding_window, kvp_handle=kvp_handle
        )

    def project_qkv(
        self,
        positions: torch.Tensor,  # [num_tokens]
        x: torch.Tensor,  # [num_tokens, hidden_size]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [num_tokens, num_heads, head_dim], k and v [num_tokens, num_kv_heads, head_dim],
        local heads, with RoPE (and Qwen3's q/k norms) applied."""
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)  # [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim], local heads
        q, k, v = qkv.split(self.qkv_proj.local_sizes, dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        return q, k, v

    def project_out(self, out: torch.Tensor) -> torch.Tensor:
        """[num_tokens, num_heads, head_dim] attention output -> [num_tokens, hidden_size]."""
        return self.o_proj(out.reshape(out.shape[0], self.num_heads * self.head_dim))

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata
    ) -> torch.Tensor:
        q, k, v = self.project_qkv(positions, x)
        return self.project_out(self.attn(q, k, v, kv_cache, meta))  # [num_tokens, hidden_size]

    def weight_loaders(self) -> dict[str, WeightLoader]:
        """Checkpoint name (relative to `self_attn.`) -> loader of this rank's part."""
        loaders: dict[str, WeightLoader] = {}
        for leaf in ("weight", "bias"):
            if getattr(self.qkv_proj, leaf) is not None:
                for shard, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                    loaders[f"{proj}.{leaf}"] = partial(self.qkv_proj.load_shard, shard, leaf)
            if getattr(self.o_proj, leaf) is not None:
                loaders[f"o_proj.{leaf}"] = partial(self.o_proj.load, leaf)
        if self.q_norm is not None and self.k_norm is not None:
            loaders["q_norm.weight"] = _replicated(self.q_norm.weight)
            loaders["k_norm.weight"] = _replicated(self.k_norm.weight)
        return loaders


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp_group: GroupHandle) -> None:
        super().__init__()
        inter = cfg.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            cfg.hidden_size, [inter, inter], False, cfg.dtype, tp_group
        )
        self.down_proj = RowParallelLinear(inter, cfg.hidden_size, False, cfg.dtype, tp_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # [num_tokens, 2 * intermediate_size / tp]: [gate | up]
        return self.down_proj(silu_and_mul(gate_up))  # [num_tokens, hidden_size]

    def weight_loaders(self) -> dict[str, WeightLoader]:
        return {
            "gate_proj.weight": partial(self.gate_up_proj.load_shard, 0, "weight"),
            "up_proj.weight": partial(self.gate_up_proj.load_shard, 1, "weight"),
            "down_proj.weight": partial(self.down_proj.load, "weight"),
        }


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self, cfg: ModelConfig, backend: AttentionBackend, tp_group: GroupHandle, kvp_handle: GroupHandle
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype)
        self.self_attn = LlamaAttention(cfg, backend, tp_group, kvp_handle)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype)
        self.mlp = LlamaMLP(cfg, tp_group)

    def forward(
        self,
        positions: torch.Tensor,  # [num_tokens]
        x: torch.Tensor,  # [num_tokens, hidden_size]
        residual: torch.Tensor | None,  # [num_tokens, hidden_size]
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream enters as x + residual (x alone when residual is None) and
        leaves as mlp_out + new_residual, returned unsummed so that the next layer's norm
        fuses the add. The roundings are those of `x = x + attn(norm1(x)); x = x + mlp(norm2(x))`:
        each sum is one add of two tensors of the model's dtype."""
        q, k, v, residual = self.pre_attention(positions, x, residual)
        out = self.self_attn.attn(q, k, v, kv_cache, meta)  # [num_tokens, num_heads, head_dim]
        return self.post_attention(out, residual)

    # The two halves around attention: everything in them is row-wise (no token sees
    # another), so they may run on padded batches (`worker/piecewise_graph.py`).

    def pre_attention(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q, k, v, residual): the input norm (residual = x + residual) and the projections."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual=residual)  # residual = x + residual
        q, k, v = self.self_attn.project_qkv(positions, h)
        return q, k, v, residual

    def post_attention(self, out: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mlp_out, residual) from the attention output [num_tokens, num_heads, head_dim]."""
        a = self.self_attn.project_out(out)  # [num_tokens, hidden_size]
        h, residual = self.post_attention_layernorm(a, residual=residual)  # residual += attn out
        return self.mlp(h), residual

    def weight_loaders(self) -> dict[str, WeightLoader]:
        loaders = {
            "input_layernorm.weight": _replicated(self.input_layernorm.weight),
            "post_attention_layernorm.weight": _replicated(self.post_attention_layernorm.weight),
        }
        loaders.update({f"self_attn.{k}": v for k, v in self.self_attn.weight_loaders().items()})
        loaders.update({f"mlp.{k}": v for k, v in self.mlp.weight_loaders().items()})
        return loaders


class LlamaForCausalLM(nn.Module):
    """One rank's part of the model: the decoder layers of its pipeline stage
    (`layer_range`), TP-sharded; the embedding on the first stage; the final norm and
    LM head on the last. `pg=None` is a single device: the whole model, unsharded."""

    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, pg: ProcessGroups | None = None) -> None:
        super().__init__()
        pg = pg or ProcessGroups.single()
        self.config = cfg
        self.pg = pg
        self.layer_range = stage_layers(cfg.num_layers, pg.parallel.spp, pg.coords.spp_rank)
        self.num_local_heads = cfg.num_heads // pg.tp.size  # query heads per layer on this TP rank
        # KV heads per layer on this TP rank: the KV cache is [num_blocks, block_size, this, head_dim]
        self.num_local_kv_heads = num_kv_heads_per_rank(cfg.num_kv_heads, pg.tp.size)
        if not self.layer_range:
            raise ValueError(
                f"pipeline stage {pg.coords.spp_rank} of {pg.parallel.spp} has no layers "
                f"(model has {cfg.num_layers})"
            )
        self.embed_tokens = (
            VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, cfg.dtype, pg.tp)
            if pg.is_first_stage
            else None
        )
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, backend, pg.tp, pg.kvp) for _ in self.layer_range)
        self.norm: RMSNorm | None = None
        self.lm_head: ParallelLMHead | None = None
        if pg.is_last_stage:
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype)
            # Tied: share the embedding's shard when it is on this stage, else hold a copy.
            tied_to = self.embed_tokens if cfg.tie_word_embeddings else None
            self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, cfg.dtype, pg.tp, tied_to=tied_to)
        self._top_level_keys = frozenset(k for k in self._weight_loaders() if not k.startswith("layers."))

    @property
    def is_first_stage(self) -> bool:
        return self.embed_tokens is not None

    @property
    def is_last_stage(self) -> bool:
        return self.lm_head is not None

    @property
    def num_local_layers(self) -> int:
        return len(self.layer_range)

    def forward(
        self,
        input_ids_or_hidden: torch.Tensor,  # first stage: [num_tokens] ids; else [num_tokens, hidden_size]
        positions: torch.Tensor,  # [num_tokens] global positions
        kv_caches: list[KVCache],  # one per local layer
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Last stage: final-normed hidden states; other stages: the residual stream for
        the next stage. Either way [num_tokens, hidden_size]."""
        x = self.embed(input_ids_or_hidden)
        residual: torch.Tensor | None = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x, residual = layer(positions, x, residual, kv_cache, meta)
        assert residual is not None  # every stage has layers
        return self.finish(x, residual)

    def embed(self, input_ids_or_hidden: torch.Tensor) -> torch.Tensor:
        """The stage's input as the residual stream [num_tokens, hidden_size]: the embedding of
        the ids on the first stage, the received hidden states as they are elsewhere."""
        if self.embed_tokens is None:
            return input_ids_or_hidden
        return self.embed_tokens(input_ids_or_hidden)

    def finish(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The stage's output from the last layer's (mlp_out, residual): final-normed on the
        last stage, the summed residual stream elsewhere. [num_tokens, hidden_size]."""
        if self.norm is None:
            return x + residual
        return self.norm(x, residual=residual)[0]

    def run_idle(self, num_shared_tokens: int) -> None:
        """This rank's KVP group has no tokens in a step where other groups merge
        `num_shared_tokens` shared rows: no compute, only an empty contribution to each local
        layer's KVP all-gather, in the order a busy forward runs them (`kvp_merge.py`).
        TP all-reduces and stage sends are skipped alike by every rank of the idle group."""
        device = next(self.parameters()).device
        for layer in self.layers:
            layer.self_attn.attn.join_idle(num_shared_tokens, self.config.dtype, device)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[num_rows, hidden_size] -> [num_rows, vocab_size], the full vocabulary on every TP rank."""
        if self.lm_head is None:
            raise RuntimeError(f"compute_logits on pipeline stage {self.pg.coords.spp_rank}, not the last")
        return self.lm_head.compute_logits(hidden)

    # ---- weight loading -------------------------------------------------------------
    # Keys are checkpoint names without the leading "model." ("layers.7.mlp.up_proj.weight").

    def _weight_loaders(self) -> dict[str, WeightLoader]:
        """Every checkpoint tensor this rank needs -> the loader slicing it for this rank."""
        loaders: dict[str, WeightLoader] = {}
        if self.embed_tokens is not None:
            loaders["embed_tokens.weight"] = self.embed_tokens.load_weight
        for idx, layer in zip(self.layer_range, self.layers, strict=True):
            loaders.update({f"layers.{idx}.{k}": v for k, v in layer.weight_loaders().items()})
        if self.norm is not None and self.lm_head is not None:
            loaders["norm.weight"] = _replicated(self.norm.weight)
            if not self.config.tie_word_embeddings:
                loaders["lm_head.weight"] = self.lm_head.load_weight
            elif self.embed_tokens is None:
                # Tied, embedding on another stage: this stage's copy of the head.
                loaders["embed_tokens.weight"] = self.lm_head.load_weight
        return loaders

    def _skips(self, name: str) -> bool:
        """A valid checkpoint tensor this rank does not hold (or nobody needs)."""
        if "rotary_emb.inv_freq" in name:
            return True
        if name in ("embed_tokens.weight", "norm.weight", "lm_head.weight"):
            # Other stages' tensors; lm_head.weight of a tied model is never used.
            return name not in self._top_level_keys
        parts = name.split(".")
        if parts[0] == "layers" and len(parts) > 2 and parts[1].isdigit():
            idx = int(parts[1])
            return idx < self.config.num_layers and idx not in self.layer_range
        return False

    def wants_weight(self, hf_name: str) -> bool:
        """False for checkpoint tensors this rank skips, so the loader need not read them."""
        return not self._skips(hf_name.removeprefix("model."))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy FULL checkpoint tensors (HF names) into place, one at a time, each sliced
        for this rank; tensors of other stages are skipped. Returns the keys loaded
        (compare with `expected_weight_keys`)."""
        loaders = self._weight_loaders()
        loaded: set[str] = set()
        for hf_name, tensor in weights:
            name = hf_name.removeprefix("model.")
            if self._skips(name):
                continue
            loader = loaders.get(name)
            if loader is None:
                raise KeyError(f"checkpoint tensor {hf_name!r} has no matching parameter")
            try:
                loader(tensor)
            except ValueError as e:
                raise ValueError(f"{hf_name}: {e}") from e
            loaded.add(name)
        return loaded

    def expected_weight_keys(self) -> set[str]:
        """The checkpoint tensors (names without "model.") this rank must load."""
        return set(self._weight_loaders())
