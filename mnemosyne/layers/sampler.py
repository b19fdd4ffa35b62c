"""Token sampling from logits: logits processors (logit_bias, min_tokens, penalties; see
logits_processors.py), then greedy, or temperature, top-k, top-p, min-p; plus logprobs.

Filtering is vectorised over the batch (per-row parameters become tensors).
Random draws use the exponential race: for probabilities p and i.i.d.
q_j ~ Exp(1), argmax_j p_j / q_j is distributed as Categorical(p). Each row draws
its own noise vector from its own generator, so a seeded row yields the same
token whatever else is in the batch and in whatever order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mnemosyne.layers.attention.metadata import to_device_packed
from mnemosyne.layers.logits_processors import TokenHistory, apply_logits_processors, needs_processing
from mnemosyne.layers.logprob_tensors import LogprobTensors
from mnemosyne.request import TokenLogprobs
from mnemosyne.sampling_params import SamplingParams


@dataclass
class SamplerOutput:
    """What was sampled, still on the device: reading `token_ids` or `logprobs` waits for it."""

    tokens: torch.Tensor  # [num_seqs] int64 on the logits' device
    logprob_rows: list[int] = field(default_factory=list)  # rows whose params ask for logprobs
    logprob_tensors: LogprobTensors | None = None  # row i: logprob_rows[i]

    @property
    def token_ids(self) -> list[int]:
        return self.tokens.tolist()

    @property
    def logprobs(self) -> list[TokenLogprobs | None]:
        """[num_seqs]; None where params.logprobs is None."""
        out: list[TokenLogprobs | None] = [None] * self.tokens.shape[0]
        if self.logprob_tensors is not None:
            for row, d in zip(self.logprob_rows, self.logprob_tensors.dicts(), strict=True):
                out[row] = d
        return out


class Sampler:
    """Stateless sampler; call with the logits of the last position of each sequence."""

    def __call__(
        self,
        logits: torch.Tensor,  # [num_seqs, vocab], any float dtype
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        histories: list[TokenHistory | None] | None = None,
    ) -> SamplerOutput:
        """`histories[i]`: the earlier tokens of row i, needed by its penalties and min_tokens
        (None where it has none). Logprobs are those of the raw logits."""
        num_seqs, vocab = logits.shape
        if len(params) != num_seqs or len(generators) != num_seqs:
            raise ValueError(
                f"got {num_seqs} logit rows, {len(params)} params and {len(generators)} generators"
            )
        if num_seqs == 0:
            return SamplerOutput(tokens=torch.empty(0, dtype=torch.long, device=logits.device))
        if all(p.greedy and p.logprobs is None and not needs_processing(p) for p in params):
            # Every row greedy, unprocessed, without logprobs: the general path's argmax, alone.
            return SamplerOutput(tokens=torch.argmax(logits.float(), dim=-1))
        params = [p.resolved() for p in params]
        raw = logits.float()  # [num_seqs, vocab]
        logits = raw
        if any(needs_processing(p) for p in params):
            logits = apply_logits_processors(raw.clone(), params, histories or [None] * num_seqs)
        tokens = torch.argmax(logits, dim=-1)  # [num_seqs]; greedy rows keep this

        sample_rows = [
            i for i, p in enumerate(params) if not p.greedy
        ]  # greedy: temperature < MIN_TEMPERATURE
        if sample_rows:
            rows = _to_device(sample_rows, torch.long, logits.device)
            sub = [params[i] for i in sample_rows]
            probs = _filtered_probs(logits.index_select(0, rows), sub)  # [num_sample, vocab]
            noise = torch.stack(
                [_exponential(vocab, generators[i], logits.device) for i in sample_rows]
            )  # [num_sample, vocab]
            tokens[rows] = torch.argmax(probs / noise, dim=-1)

        want = [i for i, p in enumerate(params) if p.logprobs is not None]
        if not want:
            return SamplerOutput(tokens=tokens)
        rows = _to_device(want, torch.long, logits.device)
        ks = [params[i].logprobs or 0 for i in want]
        lp = LogprobTensors.compute(raw.index_select(0, rows), tokens.index_select(0, rows), ks)
        return SamplerOutput(tokens=tokens, logprob_rows=want, logprob_tensors=lp)


def compute_prompt_logprobs(
    logits: torch.Tensor,  # [n, vocab]
    target_ids: torch.Tensor,  # [n]
    k: int,
) -> list[TokenLogprobs]:
    """Log-prob of target_ids[i] under log_softmax(logits[i]), plus the top-k entries of row i."""
    n = logits.shape[0]
    if n == 0:
        return []
    return LogprobTensors.compute(logits.float(), target_ids.to(logits.device).long(), [k] * n).dicts()


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small per-row parameter tensor, copied without waiting for the device (pinned,
    non-blocking on CUDA: with async scheduling the previous step may still be running)."""
    return to_device_packed((values,), dtype, device)[0]


def _exponential(vocab: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Exp(1) noise [vocab] drawn on the generator's own device (default RNG of `device` if None)."""
    gen_device = generator.device if generator is not None else device
    q = torch.empty(vocab, dtype=torch.float32, device=gen_device).exponential_(generator=generator)
    # Exp(1) may round to 0; a tiny floor keeps p / q finite (and 0 / q == 0 for filtered tokens).
    return q.clamp_min_(torch.finfo(torch.float32).tiny).to(device)  # [vocab]


def _filtered_probs(
    logits: torch.Tensor,  # [n, vocab] float32
    params: list[SamplingParams],
) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p; returns renormalised probabilities [n, vocab]."""
    n, vocab = logits.shape
    dev = logits.device
    temp = _to_device([p.temperature for p in params], torch.float32, dev)  # [n]
    x = logits / temp[:, None]  # [n, vocab]

    top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    top_p = [p.top_p for p in params]
    min_p = [p.min_p for p in params]
    if not any(top_k) and all(tp >= 1.0 for tp in top_p) and not any(min_p):
        return torch.softmax(x, dim=-1)

    # Stable descending sort: among equal logits the lowest token id ranks first.
    sorted_x, order = torch.sort(x, dim=-1, descending=True, stable=True)  # [n, vocab]
    rank = torch.arange(vocab, device=dev)  # [vocab]
    neg_inf = float("-inf")

    if any(top_k):
        k = _to_device([kk if kk > 0 else vocab for kk in top_k], torch.long, dev)  # [n]
        sorted_x = torch.where(rank[None, :] < k[:, None], sorted_x, neg_inf)

    if any(tp < 1.0 for tp in top_p):
        tp = _to_device(top_p, torch.float32, dev)  # [n]
        probs = torch.softmax(sorted_x, dim=-1)  # [n, vocab]
        mass_before = torch.cumsum(probs, dim=-1) - probs  # [n, vocab]; mass of higher ranks
        keep = (mass_before < tp[:, None]) | (rank[None, :] == 0) | (tp[:, None] >= 1.0)
        sorted_x = torch.where(keep, sorted_x, neg_inf)

    if any(min_p):
        mp = _to_device(min_p, torch.float32, dev)  # [n]
        probs = torch.softmax(sorted_x, dim=-1)  # [n, vocab]; column 0 holds the max
        keep = probs >= mp[:, None] * probs[:, :1]
        sorted_x = torch.where(keep, sorted_x, neg_inf)

    filtered = torch.full_like(x, float("-inf")).scatter_(1, order, sorted_x)  # [n, vocab]
    return torch.softmax(filtered, dim=-1)
