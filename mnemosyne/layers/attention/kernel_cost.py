"""The measured chunk-attention costs the backend picks a path by. They live in
`latency/kernel_cost.py` (torch-free) because the fitted latency model predicts with them too."""

from mnemosyne.latency.kernel_cost import H200_COST, ChunkCostModel, ChunkPath, PathCost

__all__ = ["H200_COST", "ChunkCostModel", "ChunkPath", "PathCost"]
