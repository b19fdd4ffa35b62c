"""The per-launch control secret: 32 random bytes that key the HMAC of every message.

    API server ── new_secret() ──> env MNEMOSYNE_ENGINE_CORE_SECRET ──> engine core (its own link only)
    driver (LLM or engine core) ── the given secret, else new_secret() ──> env MNEMOSYNE_CONTROL_SECRET
                                                                           ──> local workers
    torchrun workers and a driver with --driver-address: MNEMOSYNE_CONTROL_SECRET, or
    MNEMOSYNE_CONTROL_SECRET_FILE naming a file of 64 hex digits readable only by its owner (0600)

A child's environment is readable only by its user (/proc/PID/environ is 0400), as is
a 0600 file; the secret is never logged and never part of a config that crosses the wire.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path

from mnemosyne.errors import ConfigError

SECRET_ENV = "MNEMOSYNE_CONTROL_SECRET"
SECRET_FILE_ENV = "MNEMOSYNE_CONTROL_SECRET_FILE"
CORE_SECRET_ENV = "MNEMOSYNE_ENGINE_CORE_SECRET"  # API server <-> engine core, set by the server
SECRET_BYTES = 32


def new_secret() -> bytes:
    return secrets.token_bytes(SECRET_BYTES)


def secret_env(secret: bytes, name: str = SECRET_ENV) -> dict[str, str]:
    """The environment entries that hand `secret` to a child process."""
    return {name: secret.hex()}


def take_core_secret() -> bytes:
    """The engine core's link secret, removed from the environment (its workers need not see it)."""
    value = os.environ.pop(CORE_SECRET_ENV, "")
    if not value:
        raise ConfigError(f"the engine core is started by `mnemosyne serve`, which sets {CORE_SECRET_ENV}")
    return _parse(value, CORE_SECRET_ENV)


def _parse(text: str, where: str) -> bytes:
    try:
        secret = bytes.fromhex(text.strip())
    except ValueError:
        raise ConfigError(f"{where} must hold {2 * SECRET_BYTES} hex digits") from None
    if len(secret) != SECRET_BYTES:
        raise ConfigError(f"{where} must hold {2 * SECRET_BYTES} hex digits, got {2 * len(secret)}")
    return secret


def read_secret_file(path: str | Path) -> bytes:
    """A secret file must belong to this user and be unreadable by anyone else (chmod 600)."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as e:
        raise ConfigError(f"{SECRET_FILE_ENV}={path}: {e.strerror}") from None
    if st.st_uid != os.getuid() or st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"{SECRET_FILE_ENV}={path} must be owned by this user and private: chmod 600 {path}"
        )
    return _parse(p.read_text(), f"{SECRET_FILE_ENV}={path}")


def secret_from_env(env: Mapping[str, str] | None = None) -> bytes | None:
    """The secret this process was given, or None."""
    env = os.environ if env is None else env
    if env.get(SECRET_ENV):
        return _parse(env[SECRET_ENV], SECRET_ENV)
    if env.get(SECRET_FILE_ENV):
        return read_secret_file(env[SECRET_FILE_ENV])
    return None


def require_secret(purpose: str) -> bytes:
    """The given secret, or a ConfigError saying how to give one."""
    secret = secret_from_env()
    if secret is None:
        raise ConfigError(
            f"{purpose} needs the control secret shared with the workers: set {SECRET_FILE_ENV} to a "
            f"file made with `python -c 'import secrets; print(secrets.token_hex(32))' > FILE; "
            f"chmod 600 FILE` (or {SECRET_ENV} to its contents) on every machine"
        )
    return secret
