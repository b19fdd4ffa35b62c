"""Logprobs of sampled (or prompt) tokens while still on the device, and their host form.

    rows r = 0..n-1:  chosen_ids[r], chosen_lp[r]          the token taken and its logprob
                      top_ids[r, :k_max], top_lp[r, :k_max] the top-k of the raw distribution
    host form:        {chosen: logprob, top-1: logprob, ..., top-ks[r]: logprob} per row

Kept as tensors so that a step's logprobs reach the host by one non-blocking copy
(worker/pending_result.py) instead of a device sync in the sampler.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mnemosyne.request import TokenLogprobs


@dataclass
class LogprobTensors:
    chosen_ids: torch.Tensor  # [n] int64
    chosen_lp: torch.Tensor  # [n] float32
    top_ids: torch.Tensor  # [n, k_max] int64 (k_max may be 0)
    top_lp: torch.Tensor  # [n, k_max] float32
    ks: list[int]  # top-k count per row

    @classmethod
    def compute(
        cls,
        logits: torch.Tensor,  # [n, vocab] float32
        chosen: torch.Tensor,  # [n] int64
        ks: list[int],
    ) -> LogprobTensors:
        """The raw distribution's logprob of each row's chosen token, and its top-k."""
        logp = torch.log_softmax(logits, dim=-1)  # [n, vocab]
        chosen_lp = logp.gather(1, chosen.view(-1, 1)).squeeze(1)  # [n]
        k_max = min(max(ks, default=0), logits.shape[1])
        top_lp, top_ids = torch.topk(logp, k_max, dim=-1)  # [n, k_max]
        return cls(chosen, chosen_lp, top_ids, top_lp, ks)

    def to_host(self) -> LogprobTensors:
        """Copies in host memory: pinned and non-blocking from a GPU (valid once the stream
        reaches this point), plain copies on CPU."""
        if self.chosen_ids.device.type != "cuda":
            return self
        copies = (_pinned_copy(t) for t in (self.chosen_ids, self.chosen_lp, self.top_ids, self.top_lp))
        return LogprobTensors(*copies, self.ks)

    def dicts(self) -> list[TokenLogprobs]:
        """The host form, one dict per row (waits for the device if the tensors are on it)."""
        chosen_ids, chosen_lp = self.chosen_ids.tolist(), self.chosen_lp.tolist()
        top_ids, top_lp = self.top_ids.tolist(), self.top_lp.tolist()
        out: list[TokenLogprobs] = []
        for r, k in enumerate(self.ks):
            d: TokenLogprobs = {int(chosen_ids[r]): float(chosen_lp[r])}
            for j in range(min(k, len(top_ids[r]))):
                d.setdefault(int(top_ids[r][j]), float(top_lp[r][j]))
            out.append(d)
        return out


def _pinned_copy(t: torch.Tensor) -> torch.Tensor:
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=True)
