"""Attention over the paged KV cache: metadata, backend protocol, reference backend, LSE merging."""

from mnemosyne.layers.attention.backend import AttentionBackend
from mnemosyne.layers.attention.merge import merge_attn_partials, merge_attn_states
from mnemosyne.layers.attention.metadata import AttentionMetadata
from mnemosyne.layers.attention.reference import TorchReferenceBackend

__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "TorchReferenceBackend",
    "merge_attn_partials",
    "merge_attn_states",
]
