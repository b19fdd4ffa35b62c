"""Latency profiles on disk: JSON with what they were measured on, and the cache lookup.

    <cache dir>/profiles/<device>-<hash of the key>.json
    {
      "format": 2,      (1: before the model's kernel_chunk_key_s term; still read, that term 0)
      "key": {"device_name": ..., "shape": {...}, "layout": {"tp", "spp", "kvp"}, "dtype": ...},
      "model": {FittedLatencyModel.to_dict()},
      "libraries": {...}, "grid": ..., "samples": [...], "fit_error": {...}    (informational)
    }

A profile applies only where its key equals the engine's: same device name, model
shape, layout and dtype. Otherwise the roofline model is used.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from mnemosyne.errors import ConfigError
from mnemosyne.latency.fitted import FittedLatencyModel
from mnemosyne.latency.shape import Layout, ModelShape

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)


@dataclass(frozen=True)
class ProfileKey:
    device_name: str
    shape: ModelShape
    layout: Layout
    dtype: str

    def to_dict(self) -> dict:
        return {
            "device_name": self.device_name,
            "shape": self.shape.to_dict(),
            "layout": self.layout.to_dict(),
            "dtype": self.dtype,
        }

    @classmethod
    def from_dict(cls, d: dict) -> ProfileKey:
        return cls(d["device_name"], ModelShape(**d["shape"]), Layout(**d["layout"]), d["dtype"])

    def file_name(self) -> str:
        digest = hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
        device = "".join(ch if ch.isalnum() else "_" for ch in self.device_name.lower())
        return f"{device}-{digest}.json"


@dataclass(frozen=True)
class LatencyProfile:
    key: ProfileKey
    model: FittedLatencyModel
    info: dict  # libraries, grid, samples, fit error: what the file says besides the model

    def to_json(self) -> str:
        body = {
            "format": FORMAT_VERSION,
            "key": self.key.to_dict(),
            "model": self.model.to_dict(),
            **self.info,
        }
        return json.dumps(body, indent=1)


def profiles_dir(cache_dir: Path) -> Path:
    return cache_dir / "profiles"


def save_profile(profile: LatencyProfile, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(profile.to_json())
    tmp.replace(path)


def load_profile(path: str | Path) -> LatencyProfile:
    p = Path(path)
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read latency profile {p}: {e}") from None
    if d.get("format") not in READABLE_FORMATS:
        raise ConfigError(
            f"latency profile {p} has format {d.get('format')!r}; this version reads formats {READABLE_FORMATS}"
        )
    try:
        key = ProfileKey.from_dict(d["key"])
        model = FittedLatencyModel.from_dict(key.layout, d["model"], key.shape.chunk_tile_tokens)
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"latency profile {p} is malformed ({type(e).__name__}: {e})") from None
    info = {k: v for k, v in d.items() if k not in ("format", "key", "model")}
    return LatencyProfile(key, model, info)


def find_cached_profile(cache_dir: Path, key: ProfileKey) -> LatencyProfile | None:
    """The cached profile measured for exactly this key, if any (unreadable files are skipped)."""
    path = profiles_dir(cache_dir) / key.file_name()
    if not path.is_file():
        return None
    try:
        profile = load_profile(path)
    except ConfigError:
        return None
    return profile if profile.key == key else None
