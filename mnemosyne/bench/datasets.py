"""Request sets for `bench serve`: random token prompts, random word prompts, or a JSONL file."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

T = TypeVar("T")


@dataclass(frozen=True)
class BenchRequest:
    """One benchmark request.

    `prompt` is either text or a list of token ids; `prompt_len` is its length in tokens, or -1 when
    unknown (text prompts: the client then takes it from the server's `usage.prompt_tokens`).
    `output_len` is the number of tokens asked for (`max_tokens`, with `ignore_eos`).
    `arrival_s` is when to send it, in seconds after the benchmark starts (a replayed trace),
    or None to follow `--request-rate`.
    """

    prompt: str | list[int]
    prompt_len: int
    output_len: int
    arrival_s: float | None = None


def _sample_lengths(rng: np.random.Generator, n: int, mean: int, range_ratio: float) -> np.ndarray:
    """n integers drawn uniformly in [mean*(1-r), mean*(1+r)], each at least 1."""
    lo = max(1, int(mean * (1.0 - range_ratio)))
    hi = max(lo, int(mean * (1.0 + range_ratio)))
    return rng.integers(lo, hi + 1, size=n)


def _check_args(num_prompts: int, input_len: int, output_len: int, range_ratio: float) -> None:
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be at least 1, got {num_prompts}")
    if input_len < 1 or output_len < 1:
        raise ValueError(f"input_len and output_len must be at least 1, got {input_len} and {output_len}")
    if not 0.0 <= range_ratio <= 1.0:
        raise ValueError(f"range_ratio must be in [0, 1], got {range_ratio}")


def _distinct_sequence(pool: Sequence[T], index: int, length: int, rng: np.random.Generator) -> list[T]:
    """A random sequence of `length` pool items whose first items spell `index` in base len(pool).

    The prefix makes sequences with different indices differ (at position 0 whenever
    index < len(pool)), so no two requests share a prompt or a cached prefix.
    """
    base = len(pool)
    prefix: list[T] = []
    rest = index
    while len(prefix) < length:
        prefix.append(pool[rest % base])
        rest //= base
        if rest == 0 or base == 1:
            break
    tail = rng.integers(0, base, size=length - len(prefix))
    return prefix + [pool[int(j)] for j in tail]


def _clip_prompt_lens(prompt_lens: np.ndarray, output_lens: np.ndarray, max_total_len: int | None) -> None:
    """Shorten prompts in place so that prompt + output fits max_total_len (ValueError if impossible)."""
    if max_total_len is None:
        return
    worst = int(output_lens.max())
    if worst >= max_total_len:
        raise ValueError(
            f"an output length of {worst} tokens leaves no room for a prompt within the model's "
            f"context of {max_total_len} tokens; lower --output-len or --range-ratio"
        )
    np.minimum(prompt_lens, max_total_len - output_lens, out=prompt_lens)


def _draw_lengths(
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    seed: int,
    max_total_len: int | None,
) -> tuple[np.random.Generator, np.ndarray, np.ndarray]:
    """The seeded generator and each request's (clipped) prompt and output lengths."""
    _check_args(num_prompts, input_len, output_len, range_ratio)
    rng = np.random.default_rng(seed)
    prompt_lens = _sample_lengths(rng, num_prompts, input_len, range_ratio)
    output_lens = _sample_lengths(rng, num_prompts, output_len, range_ratio)
    _clip_prompt_lens(prompt_lens, output_lens, max_total_len)
    return rng, prompt_lens, output_lens


def random_requests(
    token_pool: list[int],
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    seed: int,
    max_total_len: int | None = None,
) -> list[BenchRequest]:
    """Random prompts of token ids sampled from `token_pool` (the server counts them exactly).

    Prompt and output lengths are drawn uniformly in [len*(1-range_ratio), len*(1+range_ratio)]
    (at least 1). Each prompt starts with a per-request distinct prefix. With `max_total_len`,
    prompts are shortened so that prompt_len + output_len <= max_total_len. Deterministic in `seed`.
    """
    pool = list(dict.fromkeys(int(t) for t in token_pool))
    if not pool:
        raise ValueError("the token pool is empty")
    rng, prompt_lens, output_lens = _draw_lengths(
        num_prompts, input_len, output_len, range_ratio, seed, max_total_len
    )
    out = []
    for i in range(num_prompts):
        tokens = _distinct_sequence(pool, i, int(prompt_lens[i]), rng)
        out.append(BenchRequest(prompt=tokens, prompt_len=len(tokens), output_len=int(output_lens[i])))
    return out


def random_text_requests(
    words: list[str],
    tokens_per_word: float,
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    seed: int,
    max_total_len: int | None = None,
) -> list[BenchRequest]:
    """Random text prompts (for the chat endpoint, which takes no token ids).

    Like `random_requests`, but each prompt is a string of about `prompt_len / tokens_per_word`
    words from `words`; its exact token count (chat template included) is unknown here, so
    `prompt_len` is -1 and the server's `usage.prompt_tokens` is used instead.
    """
    pool = list(dict.fromkeys(w for w in words if w))
    if not pool:
        raise ValueError("the word pool is empty")
    if tokens_per_word <= 0:
        raise ValueError(f"tokens_per_word must be positive, got {tokens_per_word}")
    rng, prompt_lens, output_lens = _draw_lengths(
        num_prompts, input_len, output_len, range_ratio, seed, max_total_len
    )
    out = []
    for i in range(num_prompts):
        n_words = max(1, round(int(prompt_lens[i]) / tokens_per_word))
        text = " ".join(_distinct_sequence(pool, i, n_words, rng))
        out.append(BenchRequest(prompt=text, prompt_len=-1, output_len=int(output_lens[i])))
    return out


def _parse_line(line: str, lineno: int, path: Path, default_output_len: int) -> BenchRequest:
    where = f"{path}:{lineno}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict) or "prompt" not in obj:
        raise ValueError(f'{where}: expected a JSON object with a "prompt" key')
    prompt = obj["prompt"]
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError(f"{where}: the prompt is empty")
        prompt_len = -1
    elif isinstance(prompt, list):
        if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt):
            raise ValueError(f"{where}: a token-id prompt must be a non-empty list of non-negative integers")
        prompt_len = len(prompt)
    else:
        raise ValueError(f'{where}: "prompt" must be a string or a list of token ids')
    output_len = obj.get("output_len", default_output_len)
    if not isinstance(output_len, int) or isinstance(output_len, bool) or output_len < 1:
        raise ValueError(f'{where}: "output_len" must be a positive integer, got {output_len!r}')
    arrival_s = obj.get("arrival_s")
    if arrival_s is not None and (
        not isinstance(arrival_s, int | float)
        or isinstance(arrival_s, bool)
        or not math.isfinite(arrival_s)
        or arrival_s < 0
    ):
        raise ValueError(f'{where}: "arrival_s" must be a non-negative number of seconds, got {arrival_s!r}')
    return BenchRequest(
        prompt=prompt,
        prompt_len=prompt_len,
        output_len=output_len,
        arrival_s=None if arrival_s is None else float(arrival_s),
    )


def file_requests(path: str | Path, num_prompts: int, default_output_len: int) -> list[BenchRequest]:
    """Requests from a JSONL file: one `{"prompt": str | list[int], "output_len": int?,
    "arrival_s": float?}` per line (other keys are ignored).

    Blank lines are skipped; a malformed line raises ValueError naming its line number. The lines
    are used in order, cycling through them again when `num_prompts` exceeds their number.
    A trace, whose lines all carry `arrival_s`, is replayed once: its first `num_prompts` lines,
    never cycled. Either every line has `arrival_s` or none has.
    """
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be at least 1, got {num_prompts}")
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        lines = [(n, line) for n, line in enumerate(f, start=1) if line.strip()]
    if not lines:
        raise ValueError(f"{path}: no requests in the file")
    parsed = [_parse_line(line, n, path, default_output_len) for n, line in lines]
    timed = [r.arrival_s is not None for r in parsed]
    if any(timed) and not all(timed):
        first = lines[timed.index(not timed[0])][0]
        raise ValueError(f'{path}:{first}: either every line has "arrival_s" or none has')
    if all(timed):
        return parsed[:num_prompts]
    return list(itertools.islice(itertools.cycle(parsed), num_prompts))
