"""Checks of a request that need the server's context (vocabulary, limits), each a 400
naming the field. Run by both handlers after tokenization, before admission.

Work per call: an API call asks for sum over its choices of (prompt + max_tokens)
tokens; a chat call without max_tokens gets the whole room its context leaves, per
choice, so `n=128` could alone queue ~128 full contexts. Calls over
`ServingContext.max_tokens_per_call` are refused with a message naming the limit.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any, Protocol

from mnemosyne.sampling_params import MAX_SEED, MIN_SEED
from mnemosyne.server.errors import APIError


class SamplingFields(Protocol):
    """What the checks read of a completions or chat body (`protocol.py`)."""

    n: int
    seed: int | None
    stream: bool
    stream_options: Any
    stop: str | list[str] | None
    stop_token_ids: list[int] | None


def bad_request(message: str, param: str) -> APIError:
    return APIError(HTTPStatus.BAD_REQUEST, message, param=param)


def check_text(text: str, param: str) -> str:
    """Text the tokenizer and the JSON encoder can take: valid Unicode (no lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise bad_request(
            f"{param!r} is not valid Unicode: a lone surrogate {text[e.start]!r} at position {e.start}", param
        ) from None
    return text


def check_sampling_fields(req: SamplingFields, vocab_size: int) -> None:
    if req.stream_options is not None and not req.stream:
        raise bad_request("'stream_options' is only allowed with 'stream': true", "stream_options")
    bad_ids = [t for t in req.stop_token_ids or () if not 0 <= t < vocab_size]
    if bad_ids:
        raise bad_request(
            f"'stop_token_ids' must be token ids in [0, {vocab_size}); got {bad_ids[:5]}", "stop_token_ids"
        )
    if req.seed is not None and not MIN_SEED <= req.seed <= MAX_SEED - (req.n - 1):
        raise bad_request(
            f"'seed' must fit in 64 bits: [{MIN_SEED}, {MAX_SEED - (req.n - 1)}] with n={req.n} "
            f"(choice i uses seed + i)",
            "seed",
        )
    if isinstance(req.stop, str):
        check_text(req.stop, "stop")
    for s in req.stop or ():
        check_text(s, "stop")


def check_work(num_tokens_per_choice: list[int], limit: int, max_request_tokens: int, param: str) -> None:
    """`num_tokens_per_choice[c]`: prompt + max_tokens of choice c. A choice over the
    per-request limit is left to admission (its 400 `context_length_exceeded` is the
    more precise error)."""
    total = sum(num_tokens_per_choice)
    if total > limit and max(num_tokens_per_choice) <= max_request_tokens:
        raise bad_request(
            f"this call asks for up to {total} tokens of work ({len(num_tokens_per_choice)} choice(s), "
            f"prompt + max_tokens each), over this server's limit of {limit} tokens per call "
            f"(--max-tokens-per-call): lower 'n' or 'max_tokens'",
            param,
        )
