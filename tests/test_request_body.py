"""The API server's body decoder: a large /v1/completions body's prompt of ids is read into
an array only when its text is a plain JSON array of non-negative integers; every other body
decodes to json.loads' value, so it is accepted or refused exactly as before."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from mnemosyne.server.protocol import CompletionRequest
from mnemosyne.server.request_body import LARGE_BODY_BYTES, decode_completion_body, parse_id_array

_INT64_MAX = np.iinfo(np.int64).max


@pytest.mark.parametrize(
    "text",
    [b"[1,2,3]", b"[ 1 , 2 ,3 ]", b"[0]", b"[0,0, 10]", b"[1,\n\t2]\r\n", b" [5] ", b"[99999999999999999999, 1]"],
)
def test_plain_integer_arrays_are_read(text: bytes) -> None:
    ids = parse_id_array(text)
    assert ids is not None and ids.dtype == np.int64
    assert ids.tolist() == [min(v, _INT64_MAX) for v in json.loads(text)]  # past int64: its max


@pytest.mark.parametrize(
    "text",
    [b"[]", b"[ ]", b"[1 2]", b"[1,,2]", b"[1,2,]", b"[,1]", b"[1.5]", b"[1.0]", b"[-1]", b"[+1]", b"[007]",
     b"[0, 07]", b"[00]", b"[1,2 3]", b"[1 ,2 3 ]", b"[1e3]", b"[[1]]", b'["1"]', b"[true]", b"[null]", b"[0x10]", b"1", b"[1", b"1]",
     b'"[1]"', b"{}"],
)  # fmt: skip
def test_anything_else_is_left_to_the_general_decoder(text: bytes) -> None:
    assert parse_id_array(text) is None


def _large_body(prompt_text: str, **fields: object) -> bytes:
    rest = "".join(f", {json.dumps(k)}: {json.dumps(v)}" for k, v in fields.items())
    body = f'{{"prompt": {prompt_text}{rest}}}'
    return body.encode()


def test_a_large_ids_body_decodes_to_json_loads_value_with_the_prompt_as_an_array() -> None:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 128_256, size=LARGE_BODY_BYTES // 4).tolist()
    body = _large_body(json.dumps(ids), max_tokens=3, stream=True, seed=18446744073709551616, stop=["\u00e9"])
    assert len(body) >= LARGE_BODY_BYTES
    value = asyncio.run(decode_completion_body(body))
    expected = json.loads(body)
    assert value["prompt"].tolist() == expected.pop("prompt")
    assert {k: v for k, v in value.items() if k != "prompt"} == expected
    req = CompletionRequest.model_validate(value)  # the array passes validation as it is
    assert req.prompt is value["prompt"] and req.prompts()[0] is value["prompt"]


@pytest.mark.parametrize(
    "prompt_text",
    ["[1, -2, 3]", "[1, 2.5]", '["a", "b"]', "[[1, 2], [3]]", '"' + "x" * 16 + '"', "[1, 2, 007]"],
)
def test_a_large_body_with_any_other_prompt_decodes_as_json_loads(prompt_text: str) -> None:
    pad = "y" * LARGE_BODY_BYTES  # a large body whose prompt is not plain ids
    body = _large_body(prompt_text, user=pad)
    if prompt_text.endswith("007]"):
        with pytest.raises(json.JSONDecodeError):  # not JSON: the same error as before
            asyncio.run(decode_completion_body(body))
        return
    assert asyncio.run(decode_completion_body(body)) == json.loads(body)


def test_small_and_non_object_bodies_decode_as_json_loads() -> None:
    for body in (b'{"prompt": [1, 2, 3]}', b"[1, 2]", b'{"a": 1, "a": 2}'):
        assert asyncio.run(decode_completion_body(body)) == json.loads(body)
    large_list = json.dumps(list(range(LARGE_BODY_BYTES // 6))).encode()  # not an object
    assert asyncio.run(decode_completion_body(large_list)) == json.loads(large_list)


def test_a_numpy_that_reads_partial_text_turns_the_fast_path_off(monkeypatch) -> None:
    """Where numpy only warns on text it cannot read to its end, every body goes the general
    way: the ids stay a list, the value json.loads' own."""
    from mnemosyne.server import request_body

    monkeypatch.setattr(request_body, "_ID_ARRAY_FAST_PATH", False)
    body = _large_body(json.dumps(list(range(LARGE_BODY_BYTES // 6))), max_tokens=1)
    assert parse_id_array(b"[1, 2]") is None
    assert asyncio.run(decode_completion_body(body)) == json.loads(body)
