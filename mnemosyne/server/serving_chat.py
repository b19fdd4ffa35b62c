"""POST /v1/chat/completions: the tokenizer's chat template, `n` samples, streamed as
`chat.completion.chunk` events or returned whole.

Stream of one call (c = choice index)::

    {delta: {role: assistant, content: ""}}         once per choice, right after admission
    {delta: {content: "..."}}                        as tokens are sampled (held-back text waits)
    {delta: {}, finish_reason: "stop" | "length"}    when the choice ends
    {choices: [], usage: {...}}                      with stream_options.include_usage
    [DONE]
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from mnemosyne.server.async_engine import RequestHandle, SubRequest
from mnemosyne.server.protocol import ChatCompletionRequest
from mnemosyne.server.serving import (
    ServingContext,
    chat_logprobs,
    collect,
    new_call_id,
    now_s,
    prompt_logprobs,
    sse_stream,
    sub_request_id,
    usage,
)
from mnemosyne.server.validation import check_sampling_fields, check_text, check_work


async def create_chat_completion(req: ChatCompletionRequest, ctx: ServingContext, raw: Request) -> Response:
    req.check()
    ctx.check_model(req.model)
    check_sampling_fields(req, ctx.vocab_size)
    messages = req.template_messages()
    for m in messages:
        check_text(m["content"], "messages")
    prompt_ids = await ctx.prompts.apply_chat_template(
        messages, req.add_generation_prompt, req.chat_template_kwargs
    )
    max_tokens = req.requested_max_tokens()
    if max_tokens is None:
        max_tokens = ctx.default_max_tokens(len(prompt_ids))
    check_work(
        [len(prompt_ids) + max_tokens] * req.n,
        ctx.max_tokens_per_call,
        ctx.max_request_tokens,
        "n" if req.n > 1 else "max_tokens",
    )
    top_k = (req.top_logprobs or 0) if req.logprobs else None
    call_id = new_call_id("chatcmpl")
    subs = [
        SubRequest(
            sub_request_id(call_id, 0, i),
            prompt_ids,
            req.sampling_params(max_tokens=max_tokens, logprobs=top_k, prompt_logprobs=None, i=i),
        )
        for i in range(req.n)
    ]
    index = {s.request_id: c for c, s in enumerate(subs)}
    handle = await ctx.engine.add(subs)
    if req.stream:
        chunks = _chunks(req, ctx, handle, call_id, index, len(prompt_ids), top_k)
        return StreamingResponse(sse_stream(handle, chunks), media_type="text/event-stream")
    outputs = await collect(raw, handle, index)
    if outputs is None:
        return Response(status_code=499)  # client closed the request; nobody reads this
    choices = []
    for c, out in enumerate(outputs):
        logprobs = None
        if top_k is not None:
            logprobs = chat_logprobs(ctx, out.token_ids, list(out.logprobs or []), top_k)
        choices.append(
            {
                "index": c,
                "message": {"role": "assistant", "content": out.text},
                "logprobs": logprobs,
                "finish_reason": out.finish_reason,
            }
        )
    body = {
        "id": call_id,
        "object": "chat.completion",
        "created": now_s(),
        "model": ctx.model_name,
        "choices": choices,
        "usage": usage(
            len(prompt_ids), sum(len(out.token_ids) for out in outputs), outputs[0].num_cached_tokens
        ),
    }
    if req.prompt_logprobs is not None:  # vLLM: one list for the shared prompt, beside the choices
        entries = list(outputs[0].prompt_logprobs or [])
        entries += [None] * (len(prompt_ids) - len(entries))
        body["prompt_logprobs"] = prompt_logprobs(ctx, prompt_ids, entries, req.prompt_logprobs)
    return JSONResponse(body)


async def _chunks(
    req: ChatCompletionRequest,
    ctx: ServingContext,
    handle: RequestHandle,
    call_id: str,
    index: dict[str, int],
    num_prompt_tokens: int,
    top_k: int | None,
) -> AsyncIterator[dict]:
    head = {"id": call_id, "object": "chat.completion.chunk", "created": now_s(), "model": ctx.model_name}
    extra = {"usage": None} if req.include_usage else {}

    def chunk(c: int, delta: dict, logprobs: dict | None = None, finish_reason: str | None = None) -> dict:
        choice = {"index": c, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return {**head, "choices": [choice], **extra}

    num_sent = [0] * len(index)  # output tokens streamed, per choice
    num_cached = [0] * len(index)  # prompt tokens taken from the prefix cache, per choice
    for c in range(len(index)):
        yield chunk(c, {"role": "assistant", "content": ""})
    async for out in handle:
        c = index[out.request_id]
        new_ids = out.token_ids[num_sent[c] :]
        logprobs = None
        if top_k is not None and new_ids:
            logprobs = chat_logprobs(ctx, new_ids, list((out.logprobs or [])[num_sent[c] :]), top_k)
        num_sent[c] = len(out.token_ids)
        num_cached[c] = out.num_cached_tokens
        if out.delta_text or logprobs is not None:
            yield chunk(c, {"content": out.delta_text}, logprobs)
        if out.finished:
            yield chunk(c, {}, None, out.finish_reason)
    if req.include_usage:
        yield {**head, "choices": [], "usage": usage(num_prompt_tokens, sum(num_sent), num_cached[0])}
