"""Incremental detokenization and stop strings, with a toy byte-level tokenizer."""

from __future__ import annotations

from mnemosyne.engine.detokenizer import IncrementalDetokenizer


class ByteTokenizer:
    """Token i is byte i; multi-byte UTF-8 characters span several tokens."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def feed(text: str, stop: list[str], prompt: str = "ab") -> tuple[IncrementalDetokenizer, list[str], bool]:
    tok = ByteTokenizer()
    d = IncrementalDetokenizer.for_prompt(tok, list(prompt.encode()), True, stop)
    deltas, hit = [], False
    for b in text.encode():
        hit = d.add_token(b)
        deltas.append(d.take_delta(hit))
        if hit:
            break
    return d, deltas, hit


def test_multibyte_characters_are_held_until_complete():
    d, deltas, hit = feed("héllo → 世界", [])
    assert not hit and d.text == "héllo → 世界"
    assert "".join(deltas) + d.take_delta(True) == "héllo → 世界"
    assert all("\ufffd" not in x for x in deltas)


def test_stop_string_spanning_tokens_is_cut_and_never_streamed():
    d, deltas, hit = feed("one two STOP three", ["STOP"])
    assert hit and d.text == "one two "
    assert "".join(deltas) == "one two "


def test_earliest_of_several_stop_strings_wins():
    d, _, hit = feed("xx END yy HALT", ["HALT", "END"])
    assert hit and d.text == "xx "


def test_no_stop_streams_everything():
    d, deltas, hit = feed("plain text", ["zzz"])
    assert not hit
    assert "".join(deltas) + d.take_delta(True) == "plain text"
