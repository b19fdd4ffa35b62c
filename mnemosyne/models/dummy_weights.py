"""Random weights in a real architecture's shapes, drawn on the device (`LoadFormat.DUMMY`).

Benchmarks build Llama-3-8B or Llama-3.2-1B shapes from a config.json alone, with no
download. Each tensor is a pure function of (seed, checkpoint name), drawn in full on the
device and then sliced by the model's normal weight loaders, so every rank of a parallel
layout, and a Hugging Face model filled by the same function, holds the same weights::

    norms                         -> 1
    embedding                     -> N(0, embed_std)
    every other matrix and bias   -> N(0, std)
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator

import torch

from mnemosyne.config import ModelConfig


def checkpoint_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF checkpoint name -> shape, for every tensor of the architecture."""
    h, d, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (cfg.vocab_size, h),
        "model.norm.weight": (h,),
    }
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for layer in range(cfg.num_layers):
        p = f"model.layers.{layer}."
        shapes |= {
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
        if cfg.qkv_bias:
            shapes |= {p + f"self_attn.{n}_proj.bias": (s,) for n, s in (("q", q), ("k", kv), ("v", kv))}
        if cfg.o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (h,)
        if cfg.qk_norm:
            shapes |= {p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)}
    return shapes


def dummy_tensor(
    name: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device | str,
    seed: int = 0,
    std: float = 0.02,
    embed_std: float = 0.02,
) -> torch.Tensor:
    """The tensor `name` of the dummy checkpoint (see the module docstring)."""
    if "norm" in name:
        return torch.ones(shape, dtype=dtype, device=device)
    gen = torch.Generator(device=device).manual_seed((seed << 32) ^ zlib.crc32(name.encode()))
    scale = embed_std if "embed_tokens" in name else std
    out = torch.empty(shape, dtype=dtype, device=device)
    return out.normal_(0.0, scale, generator=gen)


def iter_dummy_weights(
    cfg: ModelConfig,
    device: torch.device | str,
    wanted: Callable[[str], bool] | None = None,
    seed: int = 0,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for the checkpoint tensors `wanted` selects, one at a time."""
    for name, shape in checkpoint_shapes(cfg).items():
        if wanted is None or wanted(name):
            yield name, dummy_tensor(name, shape, cfg.dtype, device, seed)
