"""Per-request sampling parameters, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from mnemosyne.errors import InvalidRequestError

# Below this, logits / temperature overflows float32 (every row becomes inf/nan and
# token 0 would be drawn): such temperatures sample greedily, as in vLLM.
MIN_TEMPERATURE = 1e-5
MIN_SEED, MAX_SEED = -(1 << 63), (1 << 64) - 1  # what a 64-bit seed (int64 or uint64) holds


@dataclass
class SamplingParams:
    """How to pick each output token and when to stop.

    temperature == 0 (or below MIN_TEMPERATURE) means greedy. `logprobs=k` returns, for every sampled token,
    its log-probability plus the top-k alternatives; `prompt_logprobs=k` returns,
    for every prompt token after the first, its log-probability given its prefix
    plus the top-k alternatives. Log-probabilities are those of the model's raw
    distribution (before temperature, top-k/p and min-p).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    top_p: float = 1.0
    min_p: float = 0.0
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
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise InvalidRequestError(msg)

        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            bad(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.temperature < 0:
            bad(f"temperature must be >= 0, got {self.temperature}")
        if self.seed is not None and not MIN_SEED <= self.seed <= MAX_SEED:
            bad(f"seed must fit in 64 bits ([{MIN_SEED}, {MAX_SEED}]), got {self.seed}")
        if not (0.0 < self.top_p <= 1.0):
            bad(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            bad(f"top_k must be >= 0 (0 or -1 disables it), got {self.top_k}")
        if not (0.0 <= self.min_p <= 1.0):
            bad(f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 0):
                bad(f"{name} must be a non-negative integer, got {v!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad(f"stop strings must be non-empty strings, got {self.stop!r}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            bad(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
