"""Load a Llama-family model from a local Hugging Face directory.

Tensors stream from the *.safetensors files one at a time straight into the
parameters that were allocated (uninitialised) on the target device, so the peak
host memory is one tensor, not a second copy of the model. Under a parallel layout
each rank reads only the tensors of its pipeline stage and keeps its TP slice.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from mnemosyne.config import LoadFormat, ModelConfig
from mnemosyne.errors import ModelLoadError
from mnemosyne.layers.attention.backend import AttentionBackend
from mnemosyne.models.dummy_weights import iter_dummy_weights
from mnemosyne.models.llama import LlamaForCausalLM
from mnemosyne.parallel.groups import ProcessGroups

# Every supported architecture is served by the same implementation; the
# differences are flags in ModelConfig.
MODEL_CLASSES: dict[str, type[LlamaForCausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}


def check_model_dir(model_dir: str | Path) -> Path:
    path = Path(model_dir)
    if not path.is_dir():
        raise ModelLoadError(f"model path {str(model_dir)!r} does not exist or is not a directory")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model directory {str(path)!r} has no config.json")
    return path


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [model_dir / f for f in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"safetensors index lists missing files: {', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"model directory {str(model_dir)!r} has no *.safetensors weights")
    return files


def iter_safetensors(
    files: list[Path], wanted: Callable[[str], bool] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor in `files` for which `wanted(name)` holds (all by
    default); the others are never read from disk."""
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                if wanted is None or wanted(name):
                    yield name, f.get_tensor(name)


def load_model(
    model_dir: str | Path,
    cfg: ModelConfig,
    backend: AttentionBackend,
    device: torch.device | str,
    pg: ProcessGroups | None = None,
    load_format: LoadFormat = LoadFormat.SAFETENSORS,
    seed: int = 0,
) -> LlamaForCausalLM:
    """Build this rank's part of the model (`pg=None`: a single device, the whole model)
    and stream in the checkpoint tensors it needs, each sliced for its TP rank
    (`LoadFormat.DUMMY`: random tensors drawn on the device, `models/dummy_weights.py`)."""
    path = check_model_dir(model_dir)
    model_cls = MODEL_CLASSES[cfg.architecture]
    with torch.device(device):
        model = model_cls(cfg, backend, pg)
    if load_format == LoadFormat.DUMMY:
        weights = iter_dummy_weights(cfg, device, model.wants_weight, seed)
    else:
        weights = iter_safetensors(safetensors_files(path), model.wants_weight)
    loaded = model.load_weights(weights)
    missing = model.expected_weight_keys() - loaded
    if missing:
        raise ModelLoadError(
            f"checkpoint in {str(path)!r} is missing {len(missing)} tensors, e.g. {sorted(missing)[:4]}"
        )
    return model.eval()
