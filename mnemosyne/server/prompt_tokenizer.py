"""Prompt tokenization off the event loop.

Every stream of the server is written by one event loop. Tokenizing a long prompt on it
stops them all: a 500K-token text prompt takes about 0.9 s to encode on one CPU core,
and a serving trace on an H200 showed every stream pausing for up to 0.5 s whenever a
long prompt arrived. So prompts are encoded, rendered through the chat template and
(for echo) decoded on one thread of their own:

    event loop                         "prompts" thread (one; its own tokenizer copy)
    ----------                         ----------------------------------------------
    await prompts.encode(text)  ---->  check_text, tokenizer.encode   (Rust: releases the GIL)
    ... other streams go on ...
    <---- token ids

A fast tokenizer must not be used by two threads at once ("Already borrowed"), hence the
copy: the loop keeps its own tokenizer for one-token texts (logprobs), the engine's
output thread its own for detokenizing. One thread also keeps prompts in arrival order.
"""

from __future__ import annotations

import asyncio
import copy
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mnemosyne.errors import InvalidRequestError
from mnemosyne.server.validation import check_text


class PromptTokenizer:
    def __init__(self, tokenizer: Any) -> None:
        """`tokenizer`: a transformers tokenizer; this keeps a private copy of it."""
        self._tokenizer = copy.deepcopy(tokenizer)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prompts")

    @property
    def chat_template(self) -> str | None:
        return getattr(self._tokenizer, "chat_template", None)

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return await self._run(self._encode, text, add_special_tokens)

    async def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool, kwargs: dict[str, Any] | None
    ) -> list[int]:
        """The messages rendered through the chat template, then encoded (the template adds
        the special tokens itself)."""
        if self.chat_template is None:
            raise InvalidRequestError("this model has no chat template: use /v1/completions")
        return await self._run(self._render_and_encode, messages, add_generation_prompt, kwargs or {})

    async def decode(self, token_ids: list[int]) -> str:
        if self._tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer: its token ids have no text")
        return await self._run(self._tokenizer.decode, token_ids)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        if self._tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer: pass prompt token ids")
        check_text(text, "prompt")  # a lone surrogate would fail in the tokenizer (a 500)
        return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def _render_and_encode(
        self, messages: list[dict[str, str]], add_generation_prompt: bool, kwargs: dict[str, Any]
    ) -> list[int]:
        try:
            text = self._tokenizer.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=False, **kwargs
            )
        except Exception as e:  # template errors (e.g. role order a template forbids) are the caller's
            raise InvalidRequestError(f"the chat template rejected the messages: {e}") from e
        return self._encode(text, add_special_tokens=False)
