"""Per-request sampling parameters, validated on construction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from mnemosyne.errors import InvalidRequestError

# Below this, logits / temperature overflows float32 (every row becomes inf/nan and
# token 0 would be drawn): such temperatures sample greedily, as in vLLM.
MIN_TEMPERATURE = 1e-5
MIN_SEED, MAX_SEED = -(1 << 63), (1 << 64) - 1  # what a 64-bit seed (int64 or uint64) holds

MAX_LOGIT_BIAS = 100.0

# Fields a model's generation_config.json may set: None on a SamplingParams means "left out",
# filled by `resolved()` from the model's defaults, else from FALLBACK_DEFAULTS.
GENERATION_DEFAULT_FIELDS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
FALLBACK_DEFAULTS: dict[str, float | int] = {
    "temperature": 1.0,
    "top_k": 0,
    "top_p": 1.0,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
}


@dataclass
class SamplingParams:
    """How to pick each output token and when to stop.

    temperature == 0 (or below MIN_TEMPERATURE) means greedy. `temperature`, `top_k`, `top_p`, `min_p` and
    `repetition_penalty` left at None take the model's generation_config.json defaults
    (engine option `generation_config="auto"`), else 1.0, 0, 1.0, 0.0 and 1.0.

    Logits processors, applied in this order before temperature and filtering (as vLLM):
      - `logit_bias` {token id: bias in [-100, 100]} is added to the logits (OpenAI);
      - `min_tokens`: eos and `stop_token_ids` are banned, and stop strings not checked,
        until that many tokens are out;
      - `repetition_penalty` r (HF / vLLM, over prompt and output tokens): a logit l of a
        token seen so far becomes l / r if l > 0 else l * r;
      - `frequency_penalty` f and `presence_penalty` p (OpenAI, over output tokens only):
        l -= f * count + p * (count > 0).

    `logprobs=k` returns, for every sampled token, its log-probability plus the top-k
    alternatives; `prompt_logprobs=k` returns, for every prompt token after the first,
    its log-probability given its prefix plus the top-k alternatives. Log-probabilities
    are those of the model's raw distribution (before any processor, temperature, top-k/p
    and min-p).
    """

    max_tokens: int = 16
    temperature: float | None = None
    top_k: int | None = None  # 0 or -1: disabled
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None  # 1.0: disabled
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    min_tokens: int = 0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = dict(self.logit_bias or {})
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature is not None and self.temperature < MIN_TEMPERATURE

    @property
    def is_resolved(self) -> bool:
        return all(getattr(self, name) is not None for name in GENERATION_DEFAULT_FIELDS)

    def resolved(self, defaults: dict[str, float | int] | None = None) -> SamplingParams:
        """A copy with every left-out field filled: from `defaults` (the model's
        generation config), else FALLBACK_DEFAULTS. Returns self when nothing is left out."""
        if self.is_resolved:
            return self
        fill = {**FALLBACK_DEFAULTS, **(defaults or {})}
        return dataclasses.replace(
            self,
            **{name: fill[name] for name in GENERATION_DEFAULT_FIELDS if getattr(self, name) is None},
        )

    @property
    def penalises_repetition(self) -> bool:
        return self.repetition_penalty is not None and self.repetition_penalty != 1.0

    @property
    def needs_history(self) -> bool:
        """True when sampling needs the request's earlier tokens (penalties, min_tokens)."""
        return (
            self.penalises_repetition
            or self.frequency_penalty != 0.0
            or self.presence_penalty != 0.0
            or self.min_tokens > 0
        )

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise InvalidRequestError(msg)

        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            bad(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.temperature is not None and self.temperature < 0:
            bad(f"temperature must be >= 0, got {self.temperature}")
        if self.seed is not None and not MIN_SEED <= self.seed <= MAX_SEED:
            bad(f"seed must fit in 64 bits ([{MIN_SEED}, {MAX_SEED}]), got {self.seed}")
        if self.top_p is not None and not (0.0 < self.top_p <= 1.0):
            bad(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            bad(f"top_k must be >= 0 (0 or -1 disables it), got {self.top_k}")
        if self.min_p is not None and not (0.0 <= self.min_p <= 1.0):
            bad(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty is not None and not self.repetition_penalty > 0.0:
            bad(f"repetition_penalty must be > 0 (1 disables it), got {self.repetition_penalty}")
        for name in ("frequency_penalty", "presence_penalty"):
            v = getattr(self, name)
            if not -2.0 <= v <= 2.0:
                bad(f"{name} must be in [-2, 2], got {v}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            bad(
                f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}"
            )
        for tok, bias in self.logit_bias.items():
            if not isinstance(tok, int) or tok < 0:
                bad(f"logit_bias keys must be non-negative token ids, got {tok!r}")
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                bad(f"logit_bias values must be in [-100, 100], got {bias} for token {tok}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 0):
                bad(f"{name} must be a non-negative integer, got {v!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad(f"stop strings must be non-empty strings, got {self.stop!r}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            bad(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
