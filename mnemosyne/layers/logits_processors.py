"""Logits processors that need a request's earlier tokens (penalties, min_tokens) or
per-token state (logit_bias), and the per-request token history they read.

Order, as vLLM: logit_bias, min_tokens, repetition_penalty, frequency/presence penalty.
Temperature and top-k/p/min-p come after (layers/sampler.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from mnemosyne.sampling_params import SamplingParams


@dataclass
class TokenHistory:
    """The tokens of one request that its logits processors see, by position::

        positions [0, num_prompt_tokens)          prompt_token_ids (kept only with a repetition penalty)
        positions [num_prompt_tokens, ...)        output_token_ids[p - num_prompt_tokens]

    Fed with every chunk's (start, token_ids) in plan order. Positions already seen are
    skipped, so a request recomputed after preemption changes nothing. When output token k
    is sampled, tokens 0..k-1 are known: token k-1 is the input of the chunk that samples k.
    """

    num_prompt_tokens: int
    prompt_token_ids: tuple[int, ...] = ()
    min_tokens_banned_ids: tuple[int, ...] = ()  # eos and stop_token_ids, banned before min_tokens
    output_token_ids: list[int] = field(default_factory=list)
    _prompt_seen: torch.Tensor | None = None  # [vocab] bool, built on first use

    def seen_mask(self, vocab: int, device: torch.device) -> torch.Tensor:
        """[vocab] bool: True for every token of the prompt or the output so far."""
        if self._prompt_seen is None:
            self._prompt_seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            ids = torch.tensor(self.prompt_token_ids, dtype=torch.long, device=device)
            self._prompt_seen[ids[ids < vocab]] = True
        seen = self._prompt_seen.clone()
        out = torch.tensor(self.output_token_ids, dtype=torch.long, device=device)
        seen[out[out < vocab]] = True
        return seen

    def observe(self, start: int, token_ids: Sequence[int]) -> None:
        """Record the tokens at positions [start, start + len(token_ids))."""
        first_unseen = self.num_prompt_tokens + len(self.output_token_ids)
        end = start + len(token_ids)
        if end <= first_unseen:
            return
        if start > first_unseen:
            raise AssertionError(f"token history gap: positions [{first_unseen}, {start}) were never seen")
        self.output_token_ids.extend(token_ids[first_unseen - start :])


def needs_processing(params: SamplingParams) -> bool:
    return params.needs_history or bool(params.logit_bias)


def apply_logits_processors(
    logits: torch.Tensor,  # [n, vocab] float32, modified in place
    params: Sequence[SamplingParams],
    histories: Sequence[TokenHistory | None],
) -> torch.Tensor:
    """Apply each row's logit_bias, min_tokens and penalties; rows without any are untouched."""
    vocab = logits.shape[1]
    dev = logits.device
    for i, (p, hist) in enumerate(zip(params, histories, strict=True)):
        if not needs_processing(p):
            continue
        row = logits[i]  # [vocab]
        if p.logit_bias:
            ids = torch.tensor([t for t in p.logit_bias if t < vocab], dtype=torch.long, device=dev)
            bias = torch.tensor(
                [b for t, b in p.logit_bias.items() if t < vocab], dtype=row.dtype, device=dev
            )
            row.index_add_(0, ids, bias)
        if hist is None:
            continue
        out_ids = torch.tensor(hist.output_token_ids, dtype=torch.long, device=dev)  # [num_out]
        if p.min_tokens and len(hist.output_token_ids) < p.min_tokens and hist.min_tokens_banned_ids:
            banned = torch.tensor(hist.min_tokens_banned_ids, dtype=torch.long, device=dev)
            row.index_fill_(0, banned[banned < vocab], float("-inf"))
        if p.penalises_repetition:
            seen = hist.seen_mask(vocab, dev)  # [vocab]
            r = float(p.repetition_penalty)  # type: ignore[arg-type]
            penalised = torch.where(row > 0, row / r, row * r)
            row.copy_(torch.where(seen, penalised, row))
        if p.frequency_penalty or p.presence_penalty:
            counts = torch.bincount(out_ids, minlength=vocab)[:vocab].to(row.dtype)  # [vocab]
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
    return logits
