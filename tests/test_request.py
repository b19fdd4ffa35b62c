"""A request's prompt ids: checked once, held as one read-only int32 array, read by slices."""

from __future__ import annotations

import numpy as np
import pytest

from mnemosyne.errors import InvalidRequestError
from mnemosyne.request import TOKEN_ID_DTYPE, Request, check_token_ids
from mnemosyne.sampling_params import SamplingParams


def test_checked_ids_are_one_read_only_int32_array():
    frame = np.arange(5, dtype=TOKEN_ID_DTYPE).tobytes()
    wire = np.frombuffer(frame, dtype=TOKEN_ID_DTYPE)  # the engine core's unpacked frame
    assert check_token_ids(wire, 10) is wire  # no copy of a multi-million-id frame
    caller = np.arange(5, dtype=np.int64)
    for given in (caller, [0, 1, 2, 3, 4], [np.int32(t) for t in range(5)]):
        ids = check_token_ids(given, 10)
        assert ids.dtype == TOKEN_ID_DTYPE and not ids.flags.writeable and ids.tolist() == [0, 1, 2, 3, 4]
    caller[0] = 9
    assert check_token_ids(caller, 10) is not caller  # a caller's writable array is copied
    assert check_token_ids([], 10).dtype == TOKEN_ID_DTYPE
    for bad in ([1, 10], [-1], [1.5], ["1"], [True, False], [[1], [2]], [2**70]):
        with pytest.raises(InvalidRequestError, match=r"\[0, 10\)"):
            check_token_ids(bad, 10)


def test_token_ids_in_reads_prompt_then_outputs():
    req = Request("r", [10, 11, 12, 13], SamplingParams(max_tokens=4))
    assert req.prompt_token_ids.dtype == TOKEN_ID_DTYPE and not req.prompt_token_ids.flags.writeable
    req.output_token_ids += [20, 21]
    assert req.token_ids_in(0, 4) == (10, 11, 12, 13)
    assert req.token_ids_in(2, 6) == (12, 13, 20, 21)
    assert req.token_ids_in(4, 6) == (20, 21) and req.token_ids_in(5, 5) == ()
    assert all(type(t) is int for t in req.token_ids_in(0, 6))  # plain ints for the wire plan
    assert [req.token_id_at(p) for p in range(6)] == [10, 11, 12, 13, 20, 21]
    assert type(req.token_id_at(1)) is int
