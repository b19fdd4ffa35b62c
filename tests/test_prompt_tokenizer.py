"""Prompts are tokenized off the server's event loop (server/prompt_tokenizer.py), and the
request path does no per-token Python work on it that it can avoid."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import numpy as np
import pytest
from pydantic import TypeAdapter, ValidationError

from mnemosyne.errors import InvalidRequestError
from mnemosyne.server import async_engine
from mnemosyne.server.async_engine import SubRequest
from mnemosyne.server.errors import APIError
from mnemosyne.server.prompt_tokenizer import PromptTokenizer
from mnemosyne.server.protocol import CompletionRequest
from mnemosyne.server.serving import ServingContext
from mnemosyne.server.serving_completions import _tokenize, create_completion
from mnemosyne.wire.engine_core import TOKEN_ID_DTYPE, pack_token_ids


class FakeTokenizer:
    """Records the thread of every call; the chat template joins the contents."""

    chat_template = "{{ messages }}"

    def __init__(self) -> None:
        self.threads: list[str] = []

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.threads.append(threading.current_thread().name)
        return [len(w) for w in text.split()] + ([0] if add_special_tokens else [])

    def decode(self, ids: list[int]) -> str:
        self.threads.append(threading.current_thread().name)
        return " ".join("x" * i for i in ids)

    def apply_chat_template(self, messages, add_generation_prompt, tokenize, **kwargs) -> str:
        if kwargs.get("fail"):
            raise ValueError("roles must alternate")
        return " ".join(m["content"] for m in messages)


def test_encode_and_chat_run_on_the_prompt_thread_with_a_copy():
    original = FakeTokenizer()
    prompts = PromptTokenizer(original)

    async def run() -> tuple[list[int], list[int], str, str]:
        loop_thread = threading.current_thread().name
        ids = await prompts.encode("ab cde")
        chat = await prompts.apply_chat_template([{"role": "user", "content": "a bb"}], True, None)
        return ids, chat, await prompts.decode([2, 1]), loop_thread

    try:
        ids, chat, text, loop_thread = asyncio.run(run())
    finally:
        prompts.close()
    assert ids == [2, 3, 0] and chat == [1, 2] and text == "xx x"  # the chat template adds no special token
    assert original.threads == []  # a private copy: the loop's own tokenizer is never shared
    used = prompts._tokenizer.threads
    assert len(used) == 3 and all(t.startswith("prompts") and t != loop_thread for t in used)


def test_errors_cross_the_thread_as_the_callers():
    prompts = PromptTokenizer(FakeTokenizer())
    no_template = FakeTokenizer()
    no_template.chat_template = None
    bare = PromptTokenizer(no_template)
    none = PromptTokenizer(None)
    msgs = [{"role": "user", "content": "hi"}]
    try:
        with pytest.raises(InvalidRequestError, match="rejected the messages: roles must alternate"):
            asyncio.run(prompts.apply_chat_template(msgs, True, {"fail": True}))
        with pytest.raises(InvalidRequestError, match="no chat template"):
            asyncio.run(bare.apply_chat_template(msgs, True, None))
        with pytest.raises(APIError, match="lone surrogate"):
            asyncio.run(prompts.encode("a\ud800b"))
        with pytest.raises(InvalidRequestError, match="no tokenizer"):
            asyncio.run(none.encode("hi"))
    finally:
        for p in (prompts, bare, none):
            p.close()


def _ctx(prompts: PromptTokenizer, vocab_size: int = 100) -> ServingContext:
    return ServingContext(
        engine=SimpleNamespace(), tokenizer=None, prompts=prompts, model_name="m", max_model_len=64,
        max_request_tokens=64, vocab_size=vocab_size, max_tokens_per_call=256,
    )  # fmt: skip


def test_token_id_prompts_are_decoded_only_for_echo():
    prompts = PromptTokenizer(FakeTokenizer())
    ctx = _ctx(prompts)
    try:
        plain = asyncio.run(_tokenize(ctx, [3, 1], echo=False))
        echoed = asyncio.run(_tokenize(ctx, [3, 1], echo=True))
    finally:
        prompts.close()
    assert (plain.id_list, plain.text) == ([3, 1], "")
    assert (echoed.id_list, echoed.text) == ([3, 1], "xxx x")
    assert len(prompts._tokenizer.threads) == 1  # the echo's decode, nothing else


@pytest.mark.parametrize(("ids", "ok"), [([], True), ([0, 99], True), ([-1, 5], False), ([5, 100], False)])
def test_token_id_range_check(ids, ok):
    ctx = _ctx(PromptTokenizer(None), vocab_size=100)
    if ok:
        assert ctx.check_token_ids(ids).tolist() == ids
    else:
        with pytest.raises(InvalidRequestError, match=r"in \[0, 100\)"):
            ctx.check_token_ids(ids)


@pytest.mark.parametrize("as_array", [False, True])
def test_token_id_prompt_is_converted_once_and_packed_from_its_checked_array(monkeypatch, as_array):
    """A prompt of ids (a list, or the int64 array the body decoder reads from a large body)
    becomes a checked int32 array once on the event loop (the vocabulary check): its `n`
    sub-requests share that array and pack it for the core as it is, giving the bytes packing
    the list would."""
    added: list[list[SubRequest]] = []

    class Admitted(Exception):
        pass

    async def add(subs: list[SubRequest]):
        added.append(subs)
        raise Admitted

    ctx = _ctx(PromptTokenizer(None), vocab_size=100)
    ctx.engine = SimpleNamespace(add=add)
    ids = [3, 1, 4, 1, 5, 99, 0]
    prompt = np.array(ids, dtype=np.int64) if as_array else ids
    req = CompletionRequest.model_validate({"prompt": prompt, "n": 2, "max_tokens": 4})
    with pytest.raises(Admitted):
        asyncio.run(create_completion(req, ctx, raw=None))
    [subs] = added
    checked = subs[0].prompt_token_ids
    assert isinstance(checked, np.ndarray) and checked is subs[1].prompt_token_ids  # shared by the n samples
    assert checked.dtype == TOKEN_ID_DTYPE and checked.flags.c_contiguous and checked.tolist() == ids

    packed_from: list[object] = []

    def spy(token_ids):
        packed_from.append(token_ids)
        return pack_token_ids(token_ids)

    monkeypatch.setattr(async_engine, "pack_token_ids", spy)
    assert [s.packed_prompt() for s in subs] == [pack_token_ids(ids)] * 2
    assert all(x is checked for x in packed_from)  # the array, never a list again
    text_prompt = SubRequest("t", [7, 8], subs[0].params)  # text prompts: packed from their list
    assert text_prompt.packed_prompt() == pack_token_ids(np.array([7, 8], dtype=TOKEN_ID_DTYPE))


@pytest.mark.parametrize(
    "prompt",
    ["abc", "", [], ["a", "b"], [1, 2], [[1, 2], [3]], ["1", "2"], [1, "2"], ["a", 1], [1.0, 2.0], [1.5],
     [[1], ["a"]], [True, False], [[]], None, 5, [None], [[1, 2], [3.0]]],
)  # fmt: skip
def test_prompt_union_order_changes_no_result(prompt):
    """The request model lists token ids first (fast on long prompts); pydantic's smart union
    must pick the same member, or fail alike, as with the OpenAI order."""
    openai_order = TypeAdapter(str | list[str] | list[int] | list[list[int]])
    try:
        want = openai_order.validate_python(prompt)
    except ValidationError:
        with pytest.raises(ValidationError):
            CompletionRequest.model_validate({"prompt": prompt})
        return
    got = CompletionRequest.model_validate({"prompt": prompt}).prompt
    assert got == want and [type(x) for x in got if isinstance(got, list)] == [
        type(x) for x in want if isinstance(want, list)
    ]
