"""POST /v1/completions: one or more prompts (text or token ids), `n` samples each,
streamed as server-sent events or returned whole."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from mnemosyne.outputs import RequestOutput
from mnemosyne.server.async_engine import RequestHandle, SubRequest
from mnemosyne.server.protocol import CompletionRequest
from mnemosyne.server.request_body import yield_to_streams
from mnemosyne.server.serving import (
    LARGE_PROMPT_IDS,
    ServingContext,
    collect,
    completion_logprobs,
    new_call_id,
    now_s,
    prompt_cached_tokens,
    prompt_logprobs,
    sse_stream,
    sub_request_id,
    usage,
)
from mnemosyne.server.validation import check_sampling_fields, check_work


@dataclass
class _Prompt:
    # A text prompt's ids, or a prompt given as ids as the checked TOKEN_ID_DTYPE array
    # (`ServingContext.check_token_ids`), which the `n` sub-requests share and pack as it is.
    token_ids: list[int] | np.ndarray
    text: str  # for echo; "" without echo (decoding a long prompt's ids costs ~0.1 s per 500K)

    @functools.cached_property
    def id_list(self) -> list[int]:
        """The ids as Python ints, for echo (its text, ids and logprobs): made once."""
        ids = self.token_ids
        return ids if isinstance(ids, list) else ids.tolist()


@dataclass
class _Choice:
    """Progress of one choice while streaming."""

    prompt: _Prompt
    num_tokens_sent: int = 0
    text_offset: int = 0  # characters of the token texts sent (logprobs' text_offset, as non-streamed)
    echoed: bool = False
    num_cached_tokens: int = 0


async def create_completion(req: CompletionRequest, ctx: ServingContext, raw: Request) -> Response:
    req.check()
    ctx.check_model(req.model)
    check_sampling_fields(req, ctx.vocab_size)
    prompts = [await _tokenize(ctx, p, req.echo) for p in req.prompts()]
    n = req.n
    max_tokens = req.max_tokens if req.max_tokens is not None else 16
    work = [len(p.token_ids) + max_tokens for p in prompts for _ in range(n)]
    check_work(work, ctx.max_tokens_per_call, ctx.max_request_tokens, "n" if n > 1 else "max_tokens")
    call_id = new_call_id("cmpl")
    subs = [
        SubRequest(
            sub_request_id(call_id, p, i),
            prompt.token_ids,
            req.sampling_params(
                max_tokens=max_tokens,
                logprobs=req.logprobs,
                prompt_logprobs=req.logprobs if req.echo and req.logprobs is not None else None,
                i=i,
            ),
        )
        for p, prompt in enumerate(prompts)
        for i in range(n)
    ]
    index = {s.request_id: c for c, s in enumerate(subs)}
    choice_prompts = [prompts[c // n] for c in range(len(subs))]
    num_prompt_tokens = sum(len(p.token_ids) for p in prompts)
    handle = await ctx.engine.add(subs)
    if req.stream:
        chunks = _chunks(req, ctx, handle, call_id, index, choice_prompts, num_prompt_tokens)
        return StreamingResponse(sse_stream(handle, chunks), media_type="text/event-stream")
    outputs = await collect(raw, handle, index)
    if outputs is None:
        return Response(status_code=499)  # client closed the request; nobody reads this
    body = {
        "id": call_id,
        "object": "text_completion",
        "created": now_s(),
        "model": ctx.model_name,
        "choices": [
            _final_choice(req, ctx, c, prompt, out)
            for c, (prompt, out) in enumerate(zip(choice_prompts, outputs, strict=True))
        ],
        "usage": usage(
            num_prompt_tokens,
            sum(len(out.token_ids) for out in outputs),
            prompt_cached_tokens([out.num_cached_tokens for out in outputs], n),
        ),
    }
    return JSONResponse(body)


async def _tokenize(ctx: ServingContext, prompt: str | list[int] | np.ndarray, echo: bool) -> _Prompt:
    if isinstance(prompt, str):
        return _Prompt(await ctx.prompts.encode(prompt), prompt)
    if isinstance(prompt, list) and len(prompt) >= LARGE_PROMPT_IDS:
        await yield_to_streams()  # between FastAPI's validation and the ids' check
    out = _Prompt(ctx.check_token_ids(prompt), "")  # an array from the body decoder: min and max only
    if echo:
        out.text = await ctx.prompts.decode(out.id_list)
    return out


def _prompt_entries(out: RequestOutput, prompt: _Prompt) -> list:
    """Prompt logprobs for echo: None for the first token (it has no prefix)."""
    entries = list(out.prompt_logprobs or [])
    return entries + [None] * (len(prompt.token_ids) - len(entries))


def _final_choice(
    req: CompletionRequest, ctx: ServingContext, c: int, prompt: _Prompt, out: RequestOutput
) -> dict:
    text = prompt.text + out.text if req.echo else out.text
    logprobs = None
    if req.logprobs is not None:
        ids, entries = list(out.token_ids), list(out.logprobs or [])
        if req.echo:
            ids = prompt.id_list + ids
            entries = _prompt_entries(out, prompt) + entries
        logprobs = completion_logprobs(ctx, ids, entries, req.logprobs, 0)
    choice = {"index": c, "text": text, "logprobs": logprobs, "finish_reason": out.finish_reason}
    if req.prompt_logprobs is not None:
        entries = _prompt_entries(out, prompt)
        choice["prompt_logprobs"] = prompt_logprobs(ctx, prompt.id_list, entries, req.prompt_logprobs)
    return choice


async def _chunks(
    req: CompletionRequest,
    ctx: ServingContext,
    handle: RequestHandle,
    call_id: str,
    index: dict[str, int],
    choice_prompts: list[_Prompt],
    num_prompt_tokens: int,
) -> AsyncIterator[dict]:
    head = {"id": call_id, "object": "text_completion", "created": now_s(), "model": ctx.model_name}
    extra = {"usage": None} if req.include_usage else {}
    choices = [_Choice(p) for p in choice_prompts]
    async for out in handle:
        if not out.delta_token_ids and not out.delta_text and not out.finished:
            continue  # prefill progress
        c = index[out.request_id]
        ch = choices[c]
        text, new_ids = out.delta_text, out.token_ids[ch.num_tokens_sent :]
        entries: list = list((out.logprobs or [])[ch.num_tokens_sent :])
        if req.echo and not ch.echoed:  # the first token: prompt logprobs are complete
            text = ch.prompt.text + text
            new_ids = ch.prompt.id_list + new_ids
            entries = _prompt_entries(out, ch.prompt) + entries
            ch.echoed = True
        logprobs = None
        if req.logprobs is not None and new_ids:
            logprobs = completion_logprobs(ctx, new_ids, entries, req.logprobs, ch.text_offset)
            ch.text_offset = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])
        ch.num_tokens_sent = len(out.token_ids)
        ch.num_cached_tokens = out.num_cached_tokens
        choice = {"index": c, "text": text, "logprobs": logprobs, "finish_reason": out.finish_reason}
        yield {**head, "choices": [choice], **extra}
    if req.include_usage:
        num_out = sum(ch.num_tokens_sent for ch in choices)
        num_cached = prompt_cached_tokens([ch.num_cached_tokens for ch in choices], req.n)
        yield {**head, "choices": [], "usage": usage(num_prompt_tokens, num_out, num_cached)}
