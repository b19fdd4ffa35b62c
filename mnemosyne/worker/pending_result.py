"""A plan's result while its sampled ids (and logprobs) are still on their way from the device.

With async scheduling the engine launches plan n+1 before it reads plan n's tokens::

    worker, plan n    forward, sample -> tokens, logprobs (device) --copy, non-blocking-->
                      pinned host; record `done` (a CUDA event after the copies, so after
                      all of plan n)
    worker, plan n+1  decode-ahead inputs: input_ids[rows] = plan n's tokens[rows'] (device;
                      with several ranks through one all-reduce: worker/decode_ahead.py)
    engine            get_result(n) -> wait() waits for `done` only now, and fills the
                      StepResult's sampled ids and logprobs

On CPU every op has run when it returns, so nothing is copied and `done` is None.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mnemosyne.layers.logprob_tensors import LogprobTensors
from mnemosyne.layers.sampler import SamplerOutput
from mnemosyne.wire.plan import StepResult


@dataclass
class PendingResult:
    result: StepResult  # complete except sampled ids and logprobs (filled by `wait`)
    request_ids: list[str]  # request of row i of `tokens`
    rows: dict[str, int]  # request id -> its row of `tokens`
    tokens: torch.Tensor  # [num_sampled] int64 on the device
    host_tokens: torch.Tensor  # [num_sampled] int64, pinned on CUDA; valid once `done` fired
    logprob_ids: list[str]  # request of row i of `host_logprobs`
    host_logprobs: LogprobTensors | None  # pinned on CUDA; valid once `done` fired
    done: torch.cuda.Event | None

    @classmethod
    def start(cls, result: StepResult, request_ids: list[str], sampled: SamplerOutput) -> PendingResult:
        """Start copying what was sampled to the host; marks the end of the plan's device work."""
        tokens = sampled.tokens
        rows = {rid: i for i, rid in enumerate(request_ids)}
        logprob_ids = [request_ids[i] for i in sampled.logprob_rows]
        lp = sampled.logprob_tensors
        if tokens.device.type != "cuda":
            return cls(result, request_ids, rows, tokens, tokens, logprob_ids, lp, None)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        host_lp = lp.to_host() if lp is not None else None
        done = torch.cuda.Event()
        done.record()
        return cls(result, request_ids, rows, tokens, host, logprob_ids, host_lp, done)

    def ready(self) -> bool:
        """True once the sampled ids are on the host (`wait` returns at once)."""
        return self.done is None or self.done.query()

    def wait(self) -> StepResult:
        """The complete StepResult (waits for the plan's device work)."""
        self._wait_copy()
        self.result.sampled_token_ids = dict(zip(self.request_ids, self.host_tokens.tolist(), strict=True))
        if self.host_logprobs is not None:
            self.result.logprobs.update(zip(self.logprob_ids, self.host_logprobs.dicts(), strict=True))
        return self.result

    def _wait_copy(self) -> None:
        if self.done is not None:
            self.done.synchronize()
