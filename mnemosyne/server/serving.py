"""What the completion and chat handlers share: the serving context (engine,
tokenizer, limits), sub-request ids, logprob formatting, usage and SSE framing.

Sub-requests of one API call (`n` samples of each of `P` prompts)::

    choice index  c = p * n + i          request id  f"{call_id}-{p}-{i}"
    sample seed   seed + i               (when the call gives a seed)
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, TypeVar

import numpy as np
from fastapi import Request

from mnemosyne.errors import ContextLengthError
from mnemosyne.outputs import RequestOutput
from mnemosyne.request import TokenLogprobs, check_token_ids
from mnemosyne.server.async_engine import AsyncEngine, RequestHandle
from mnemosyne.server.errors import APIError
from mnemosyne.server.prompt_tokenizer import PromptTokenizer

T = TypeVar("T")

# A prompt of this many ids in a Python list takes about 8 ms to check on the event loop
# (benchmarks/results/probes/prompt_parse_cost_*): the handler yields before that check.
LARGE_PROMPT_IDS = 1 << 17


@dataclass
class ServingContext:
    engine: AsyncEngine
    tokenizer: Any  # a transformers tokenizer owned by the event loop thread: one-token texts
    prompts: PromptTokenizer  # prompts are tokenized on a thread of their own, off the loop
    model_name: str
    max_model_len: int
    max_request_tokens: int  # min(max_model_len, KV capacity of one request)
    vocab_size: int
    max_tokens_per_call: int  # prompt + max_tokens summed over a call's choices (ServerArgs)
    _token_text: dict[int, str] = field(default_factory=dict)

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(
                HTTPStatus.NOT_FOUND,
                f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )

    def check_token_ids(self, ids: list[int] | np.ndarray) -> np.ndarray:
        """`ids` as a 1-D TOKEN_ID_DTYPE array if all are in the vocabulary
        (`request.check_token_ids`), else InvalidRequestError. The one conversion of a prompt
        of ids on the event loop: `SubRequest` keeps the array and packs it for the core."""
        return check_token_ids(ids, self.vocab_size, "token ids")

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode([token_id])
        return text

    def default_max_tokens(self, num_prompt_tokens: int) -> int:
        """Chat without max_tokens: whatever room the context leaves."""
        room = self.max_request_tokens - num_prompt_tokens
        if room <= 0:
            raise ContextLengthError(
                f"the prompt has {num_prompt_tokens} tokens, which leaves no room to generate within "
                f"this server's limit of {self.max_request_tokens} tokens per request"
            )
        return room


def new_call_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sub_request_id(call_id: str, prompt_index: int, sample_index: int) -> str:
    return f"{call_id}-{prompt_index}-{sample_index}"


def now_s() -> int:
    return int(time.time())


def usage(num_prompt_tokens: int, num_completion_tokens: int, num_cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; cached_tokens: prompt tokens whose KV came from the prefix cache."""
    return {
        "prompt_tokens": num_prompt_tokens,
        "completion_tokens": num_completion_tokens,
        "total_tokens": num_prompt_tokens + num_completion_tokens,
        "prompt_tokens_details": {"cached_tokens": num_cached_tokens},
    }


def prompt_cached_tokens(cached_per_choice: list[int], n: int) -> int:
    """Cached tokens counted like prompt_tokens, once per prompt: its first sample's
    (choice p * n of prompt p), whose lookup ran before its siblings could share."""
    return sum(cached_per_choice[::n])


def top_entries(entry: TokenLogprobs, k: int) -> list[tuple[int, float]]:
    """The k most likely of one position's logprobs (the entry holds the top-k plus the chosen token)."""
    return sorted(entry.items(), key=lambda kv: -kv[1])[:k]


def top_with_chosen(entry: TokenLogprobs, k: int, chosen: int) -> dict[int, float]:
    """The top k plus the chosen token (up to k + 1 entries), as OpenAI's completions
    API and vLLM return them; `logprobs: 0` gives just the chosen token."""
    return {**dict(top_entries(entry, k)), chosen: entry[chosen]}


def completion_logprobs(
    ctx: ServingContext,
    token_ids: list[int],
    entries: list[TokenLogprobs | None],
    k: int,
    text_offset: int,
) -> dict[str, list]:
    """OpenAI's completions `logprobs` object; a None entry (first prompt token) has no logprob."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for tid, entry in zip(token_ids, entries, strict=True):
        text = ctx.token_text(tid)
        tokens.append(text)
        offsets.append(text_offset)
        text_offset += len(text)
        if entry is None:
            token_logprobs.append(None)
            tops.append(None)
        else:
            token_logprobs.append(entry[tid])
            tops.append({ctx.token_text(t): lp for t, lp in top_with_chosen(entry, k, tid).items()})
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(ctx: ServingContext, token_ids: list[int], entries: list[TokenLogprobs], k: int) -> dict:
    """OpenAI's chat `logprobs` object: {"content": [{token, logprob, bytes, top_logprobs}]}."""

    def item(tid: int, lp: float) -> dict[str, Any]:
        text = ctx.token_text(tid)
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    content = []
    for tid, entry in zip(token_ids, entries, strict=True):
        content.append(
            {**item(tid, entry[tid]), "top_logprobs": [item(t, lp) for t, lp in top_entries(entry, k)]}
        )
    return {"content": content}


def prompt_logprobs(
    ctx: ServingContext, prompt_ids: list[int], entries: list[TokenLogprobs | None], k: int
) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's `prompt_logprobs`: per prompt token, None for the first, else
    {token id: {"logprob", "rank", "decoded_token"}} for the token itself and the k most likely
    (rank 1 = most likely; the prompt token's rank only when it is among those k)."""
    out: list[dict[str, dict[str, Any]] | None] = []
    for tid, entry in zip(prompt_ids, entries, strict=True):
        if entry is None:
            out.append(None)
            continue
        ranked = top_entries(entry, k)
        ranks = {t: r for r, (t, _) in enumerate(ranked, 1)}
        out.append(
            {
                str(t): {"logprob": entry[t], "rank": ranks.get(t), "decoded_token": ctx.token_text(t)}
                for t in dict.fromkeys([tid, *(t for t, _ in ranked)])
            }
        )
    return out


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def sse_stream(handle: RequestHandle, payloads: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    """Server-sent events of a call's chunks, then `data: [DONE]`. If the engine stops
    mid-stream the client gets the error in-band; the handle is closed either way (a
    cancelled stream aborts what is unfinished)."""
    try:
        async for payload in payloads:
            yield sse(payload)
    except APIError as e:
        yield sse(e.body())
    finally:
        handle.close()
    yield "data: [DONE]\n\n"


async def collect(raw: Request, handle: RequestHandle, index: dict[str, int]) -> list[RequestOutput] | None:
    """The final output of every sub-request, in choice order (`index`: request id ->
    choice), or None if the client disconnected first (the handle then aborts them)."""
    outputs: list[RequestOutput | None] = [None] * len(index)

    async def run() -> list[RequestOutput]:
        try:
            async for out in handle:
                outputs[index[out.request_id]] = out
        finally:
            handle.close()
        assert all(o is not None for o in outputs)
        return outputs  # type: ignore[return-value]

    return await until_disconnect(raw, run())


async def until_disconnect(raw: Request, work: Awaitable[T]) -> T | None:
    """Await `work` unless the client disconnects first (then cancel it, return None).
    Used by non-streaming calls; streaming ones are cancelled by Starlette itself."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await raw.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)  # let its cleanup (abort) run
    return None if task.cancelled() else task.result()
