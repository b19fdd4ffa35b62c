"""Request bodies off the wire, on the event loop every stream shares.

Every route decodes its JSON body with msgspec first (half json.loads' time: a 500K-id
prompt's 3.6-MB body, 15 against 30 ms on a 2-core CPU, `benchmarks/probes/prompt_parse_cost.py`).
For every body msgspec accepts, the result is json.loads' (the same values, big integers
included); anything it refuses (NaN or Infinity, lone surrogates, UTF-16, malformed JSON)
goes to json.loads as before, so every error, and FastAPI's 400 for a body that is not JSON,
stays what it was.

/v1/completions goes further for a large body whose `prompt` is one array of token ids:

    body ─ msgspec: top-level keys -> raw JSON spans ──(yield)── prompt span -> int64 array
                                                                 other spans -> msgspec values

The ids never become 500K Python ints: numpy reads the span's digits in one C call, pydantic
takes the array as it is (`protocol.TokenIdArray`), and the handler's vocabulary check and
the wire frame read it without another conversion. A span that is anything but decimal
digits, commas and whitespace in brackets (a sign, a fraction, a leading zero, an empty
element, nested arrays, a string) falls back to the general decode, so it is refused or
accepted exactly as before.
"""

from __future__ import annotations

import asyncio
import json
import re
import warnings
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import msgspec
import numpy as np
from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.types import Receive, Scope

# A body this large takes one C call of 10-30 ms per step on the event loop (parse,
# validation, the ids' check: benchmarks/results/probes/prompt_parse_cost_*): the handler
# yields between those steps so that the other streams' pending chunks go out in between.
LARGE_BODY_BYTES = 1 << 20

_ID_ARRAY_CHARS = b"0123456789, \t\n\r"
_JSON_WHITESPACE = b" \t\n\r"
_LEADING_ZERO = re.compile(rb",0[0-9]")  # on the text without whitespace


async def yield_to_streams() -> None:
    """Two turns of the event loop: one runs the io thread's posted outputs (waking the
    streams' tasks), the next runs those tasks, which write their chunks."""
    await asyncio.sleep(0)
    await asyncio.sleep(0)


def decode_json(body: bytes | msgspec.Raw) -> Any:
    """json.loads' value of `body`, by msgspec where it can (module docstring)."""
    try:
        return msgspec.json.decode(body)
    except msgspec.DecodeError:
        return json.loads(bytes(body))  # its answer and its errors (json.JSONDecodeError)


def parse_id_array(text: bytes) -> np.ndarray | None:
    """`text`, a JSON array of one or more non-negative integers (`[12, 0, 7]`), as a 1-D
    int64 array; None for any other text, and always None with a numpy that reads partial
    text (`_fromstring_refuses_partial_reads`). An integer past int64 reads as int64's
    maximum, which the vocabulary check refuses as the exact value would be."""
    if not _ID_ARRAY_FAST_PATH:
        return None
    text = text.strip(_JSON_WHITESPACE)
    if len(text) < 3 or text[:1] != b"[" or text[-1:] != b"]":
        return None
    inner = text[1:-1]
    if inner.translate(None, _ID_ARRAY_CHARS):  # some other character
        return None
    compact = inner.translate(None, _JSON_WHITESPACE)
    if (
        not compact[:1].isdigit()
        or (compact[:1] == b"0" and compact[1:2].isdigit())
        or _LEADING_ZERO.search(compact)
    ):
        return None
    try:  # ValueError where an element is missing (",,", a trailing comma) or split by whitespace
        ids = np.fromstring(inner, dtype=np.int64, sep=",")
    except ValueError:
        return None
    return ids if len(ids) == compact.count(b",") + 1 else None


def _fromstring_refuses_partial_reads() -> bool:
    """Whether this numpy raises on text it cannot read to its end. Older ones warn and
    return what they read: "[1, 2 3]" would read as [1, 2], as many ids as elements, so the
    fast path is off there and every body goes the general way."""
    with warnings.catch_warnings():  # at import, before any other thread of the server runs
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            np.fromstring(b"1,2 3", dtype=np.int64, sep=",")
        except ValueError:
            return True
    return False


_ID_ARRAY_FAST_PATH = _fromstring_refuses_partial_reads()


async def decode_body(body: bytes) -> Any:
    """The body's JSON value (`decode_json`); after a large body's parse, two turns of the
    event loop before FastAPI validates it, another long step."""
    value = decode_json(body)
    if len(body) >= LARGE_BODY_BYTES:
        await yield_to_streams()
    return value


async def decode_completion_body(body: bytes) -> Any:
    """`decode_body`'s value, but for a large body whose `prompt` is an array of ids, that
    prompt as an int64 array (module docstring), with a yield between the body's split and
    the ids' parse too."""
    if len(body) < LARGE_BODY_BYTES:
        return decode_json(body)
    try:
        spans = msgspec.json.decode(body, type=dict[str, msgspec.Raw])
    except (msgspec.DecodeError, msgspec.ValidationError):
        return await decode_body(body)
    if "prompt" not in spans:
        return await decode_body(body)
    await yield_to_streams()
    ids = parse_id_array(bytes(spans["prompt"]))
    if ids is None:
        return await decode_body(body)
    value = {key: decode_json(span) for key, span in spans.items() if key != "prompt"}
    value["prompt"] = ids
    await yield_to_streams()  # before FastAPI validates it, another long step
    return value


BodyDecoder = Callable[[bytes], Awaitable[Any]]


class _JSONRequest(Request):
    """A request whose JSON body `decode` reads, once."""

    def __init__(self, scope: Scope, receive: Receive, decode: BodyDecoder = decode_body) -> None:
        super().__init__(scope, receive)
        self._decode = decode

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = await self._decode(await self.body())
        return self._json


class JSONRoute(APIRoute):
    """A route whose handler reads its JSON body through `decode`."""

    decode: BodyDecoder = staticmethod(decode_body)

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        decode = self.decode

        async def route(request: Request) -> Response:
            return await handler(_JSONRequest(request.scope, request.receive, decode))

        return route


class CompletionRoute(JSONRoute):
    """/v1/completions: a prompt of ids in a large body is read as an array."""

    decode = staticmethod(decode_completion_body)
