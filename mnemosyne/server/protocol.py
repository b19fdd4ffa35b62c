"""Request bodies of the OpenAI-compatible API (pydantic), and how they become
`SamplingParams`.

Unknown top-level fields are refused with a 400 naming them, and so are fields we know
but do not implement (tools, response_format, suffix, ...). vLLM instead ignores unknown
fields with a logged warning; we refuse because an ignored field changes the output
without telling the client (a misspelt `max_token`, or an extension such as
`guided_json` that this server lacks), and a client that sends harmless extras can drop
them. Fields OpenAI defines that do not change the output (`user`, `metadata`, `store`,
`service_tier`, `parallel_tool_calls`) are accepted. Inside nested objects (messages,
content parts, stream_options) unknown keys are ignored: clients echo back whole
response messages, with keys such as `refusal` or `annotations`.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidatorFunctionWrapHandler,
    WrapValidator,
)
from pydantic.json_schema import SkipJsonSchema

from mnemosyne.errors import InvalidRequestError
from mnemosyne.sampling_params import MAX_LOGIT_BIAS, SamplingParams
from mnemosyne.server.errors import APIError

MAX_N = 128
MAX_TOP_LOGPROBS = 20


def _token_id_array(value: object) -> np.ndarray:
    if isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype == np.int64:
        return value
    raise ValueError("not an array of token ids")


def _array_before_union(value: object, handler: ValidatorFunctionWrapHandler) -> object:
    # The smart union would first try its other members on the array, element by element (1 s).
    return _token_id_array(value) if isinstance(value, np.ndarray) else handler(value)


# A prompt of ids the body decoder already read into an array (`request_body.parse_id_array`):
# taken as it is, where a list of 500K ids takes pydantic 8-31 ms to validate. Not in the API's
# schema: clients send a JSON array of integers, which the list[int] member describes.
TokenIdArray = Annotated[np.ndarray, PlainValidator(_token_id_array), PlainSerializer(lambda a: a.tolist())]


class _Body(BaseModel):
    """A nested object: unknown keys are ignored."""

    model_config = ConfigDict(extra="ignore")


class _RequestBody(BaseModel):
    """A whole request body: unknown keys are kept in model_extra and refused by check()."""

    model_config = ConfigDict(extra="allow")

    def check_unknown_fields(self) -> None:
        unknown = sorted(self.model_extra or {})
        if unknown:
            names = ", ".join(repr(n) for n in unknown)
            raise APIError(
                HTTPStatus.BAD_REQUEST,
                f"unknown field(s) {names}: this server refuses fields it does not implement "
                f"rather than ignoring them",
                param=unknown[0],
            )


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingFields(_RequestBody):
    """The fields completions and chat share. Sampling fields left out (None) take the
    model's generation_config.json defaults (`--generation-config auto`)."""

    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    # Accepted and ignored: OpenAI fields that do not change the output.
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    # Extensions (as in vLLM), sent by the openai client through extra_body.
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    min_tokens: int = Field(0, ge=0)
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def _refuse_unsupported(self, extra: dict[str, Any]) -> None:
        self.check_unknown_fields()
        if self.stream and self.prompt_logprobs is not None:
            raise InvalidRequestError("'prompt_logprobs' is not available with 'stream': true")
        for name, bad in extra.items():
            if bad:
                raise InvalidRequestError(f"{name!r} is not supported by this server")

    def _logit_bias(self) -> dict[int, float]:
        out: dict[int, float] = {}
        for key, bias in (self.logit_bias or {}).items():
            try:
                token = int(key)
            except ValueError:
                raise InvalidRequestError(f"logit_bias keys must be token ids, got {key!r}") from None
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise InvalidRequestError(f"logit_bias values must be in [-100, 100], got {bias} for {key}")
            out[token] = bias
        return out

    def sampling_params(self, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None, i: int):
        """The params of the i-th of `n` samples (a seed s gives samples seeds s, s+1, ...).
        `prompt_logprobs`: what the route needs (echo); the request's own field may ask more."""
        if self.prompt_logprobs is not None:
            prompt_logprobs = max(prompt_logprobs or 0, self.prompt_logprobs)
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            frequency_penalty=self.frequency_penalty or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            min_tokens=self.min_tokens,
            logit_bias=self._logit_bias(),
            seed=None if self.seed is None else self.seed + i,
            stop=self.stop if self.stop is not None else [],
            stop_token_ids=self.stop_token_ids or [],
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens,
        )


class CompletionRequest(_SamplingFields):
    # Token ids first: pydantic's smart union picks the same member in any order, but this
    # order validates a 500K-id prompt in 4 ms instead of 86 ms (on the event loop). An array
    # never reaches the union; it is last so that a bad prompt's first error is list[int]'s.
    prompt: Annotated[
        list[int] | str | list[str] | list[list[int]] | SkipJsonSchema[TokenIdArray],
        WrapValidator(_array_before_union),
    ]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def check(self) -> None:
        self._refuse_unsupported(
            {"best_of": self.best_of not in (None, self.n), "suffix": self.suffix is not None}
        )

    def prompts(self) -> list[str | list[int] | np.ndarray]:
        p = self.prompt
        if isinstance(p, str | np.ndarray):
            return [p]
        if not p:
            raise InvalidRequestError("'prompt' is empty")
        if isinstance(p[0], int):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise InvalidRequestError(
                    f"message content of type {part.type!r} is not supported (text only)"
                )
            parts.append(part.text)
        return "".join(parts)


class ResponseFormat(_Body):
    type: str = "text"


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: ResponseFormat | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    def check(self) -> None:
        self._refuse_unsupported(
            {
                "tools": bool(self.tools),
                "tool_choice": self.tool_choice not in (None, "none", "auto"),
                "response_format": self.response_format is not None and self.response_format.type != "text",
            }
        )
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("'top_logprobs' needs 'logprobs': true")

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def template_messages(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


class TokenizeRequest(_RequestBody):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_RequestBody):
    model: str | None = None
    tokens: list[int]
