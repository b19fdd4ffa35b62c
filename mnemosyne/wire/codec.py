"""msgspec encoding with an HMAC-SHA256 on every frame; what fails is dropped and counted.

One frame::

    b"MNEM" | version (1 byte) | HMAC-SHA256(secret, header + body) (32 bytes) | body (msgpack)

The body is a msgspec tagged union (each message type a `Struct` with its own tag), so
a frame can only ever become one of the types the receiving side expects: nothing is
unpickled, nothing executes. Checks run in order, cheapest first; the first that
fails drops the frame, increments `rejected[reason]` and logs (rate-limited):

    SHORT (under 37 bytes) -> VERSION (header) -> MAC (constant-time compare) -> DECODE
    (msgpack or schema) -> PEER (the receiver's own check: a rank claiming another's identity)

Frames are authenticated, not encrypted and not replay-protected: across machines,
run the control port over a private network (see the README's multi-node recipe).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
from collections import Counter
from typing import Any, Generic, TypeVar

import msgspec
import torch

PROTOCOL_VERSION = 1
_HEADER = b"MNEM" + bytes([PROTOCOL_VERSION])
_MAC_BYTES = 32
_MIN_FRAME = len(_HEADER) + _MAC_BYTES + 1
MAX_FRAME_BYTES = 1 << 30  # ZMQ_MAXMSGSIZE of every control socket

logger = logging.getLogger(__name__)

T = TypeVar("T")


class RejectReason(enum.Enum):
    SHORT = "short"
    VERSION = "version"
    MAC = "mac"
    DECODE = "decode"
    PEER = "peer"


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


def _dec_hook(typ: type, obj: Any) -> Any:
    if typ is torch.dtype and isinstance(obj, str) and isinstance(getattr(torch, obj, None), torch.dtype):
        return getattr(torch, obj)
    raise NotImplementedError(f"cannot decode {typ}")


def peer_name(identity: bytes) -> str:
    """A ZeroMQ identity as logs show it (any bytes a peer chose, shortened)."""
    return repr(identity[:32])


class Codec(Generic[T]):
    """Signs what this side sends; verifies and decodes what it receives (type `recv_type`)."""

    def __init__(self, secret: bytes, recv_type: Any, channel: str) -> None:
        self._secret = secret
        self._encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
        self._decoder = msgspec.msgpack.Decoder(recv_type, dec_hook=_dec_hook)
        self.channel = channel  # for logs and metrics
        self.rejected: Counter[RejectReason] = Counter()

    @property
    def num_rejected(self) -> int:
        return sum(self.rejected.values())

    def _mac(self, body: bytes | memoryview) -> bytes:
        return hmac.new(self._secret, _HEADER + bytes(body), hashlib.sha256).digest()

    def encode(self, msg: Any) -> bytes:
        body = self._encoder.encode(msg)
        return _HEADER + self._mac(body) + body

    def decode(self, frame: bytes, peer: str = "?") -> T | None:
        """The message, or None (dropped, counted, logged) if the frame fails any check."""
        if len(frame) < _MIN_FRAME:
            return self.reject(RejectReason.SHORT, peer, f"{len(frame)} bytes")
        header, mac, body = (
            frame[: len(_HEADER)],
            frame[len(_HEADER) : _MIN_FRAME - 1],
            frame[_MIN_FRAME - 1 :],
        )
        if header != _HEADER:
            return self.reject(RejectReason.VERSION, peer, f"header {header!r}, expected {_HEADER!r}")
        if not hmac.compare_digest(mac, self._mac(body)):
            return self.reject(RejectReason.MAC, peer, "bad HMAC (wrong or no control secret)")
        try:
            return self._decoder.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError) as e:
            return self.reject(RejectReason.DECODE, peer, str(e)[:200])

    def decode_routed(self, frames: list[bytes]) -> tuple[bytes, T] | None:
        """A ROUTER socket's frames [identity, frame] -> (identity, message), or None when
        the frame count or the frame fails a check (dropped, counted, logged)."""
        if len(frames) != 2:
            return self.reject(RejectReason.SHORT, peer_name(frames[0]), f"{len(frames) - 1} frames")
        msg = self.decode(frames[1], peer_name(frames[0]))
        return None if msg is None else (frames[0], msg)

    def reject(self, reason: RejectReason, peer: str, detail: str) -> None:
        """Count and log a dropped frame (the first 10, then every power of 10)."""
        self.rejected[reason] += 1
        n = self.rejected[reason]
        if n <= 10 or str(n).rstrip("0") == "1":
            logger.warning(
                "%s: dropped a control message from %s (%s: %s; %d dropped so far)",
                self.channel,
                peer,
                reason.value,
                detail,
                self.num_rejected,
            )
        return None
