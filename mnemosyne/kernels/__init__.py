"""Triton kernels for attention over the paged KV cache."""
