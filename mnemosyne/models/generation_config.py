"""A model's sampling defaults from its generation_config.json (as vLLM's
`--generation-config auto`): the values a request's left-out fields take."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from mnemosyne.errors import ModelLoadError
from mnemosyne.sampling_params import GENERATION_DEFAULT_FIELDS, SamplingParams

logger = logging.getLogger(__name__)

GENERATION_CONFIG_FILE = "generation_config.json"


def load_generation_defaults(model_dir: str | Path) -> dict[str, float | int]:
    """{field: value} for the GENERATION_DEFAULT_FIELDS the file sets (none if it is absent).
    As vLLM, `do_sample` is not consulted: a temperature in the file applies."""
    path = Path(model_dir) / GENERATION_CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e
    defaults = {name: data[name] for name in GENERATION_DEFAULT_FIELDS if data.get(name) is not None}
    if defaults:
        SamplingParams(**defaults)  # type: ignore[arg-type]  # raises on values out of range
        logger.info("sampling defaults from %s: %s", path, defaults)
    return defaults
