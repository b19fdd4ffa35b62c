"""A plan's result while its sampled ids are still on their way from the device.

With async scheduling the engine launches plan n+1 before it reads plan n's tokens::

    worker, plan n    forward, sample -> tokens (device) --copy, non-blocking--> pinned host
                      record `done` (a CUDA event after the copy, so after all of plan n)
    worker, plan n+1  decode-ahead inputs: input_ids[rows] = plan n's tokens[rows'] (device)
    engine            get_result(n) -> wait() waits for `done` only now, and fills the
                      StepResult's sampled ids

On CPU every op has run when it returns, so nothing is copied and `done` is None.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mnemosyne.wire.plan import StepResult


@dataclass
class PendingResult:
    result: StepResult  # complete except sampled_token_ids (filled by `wait`)
    request_ids: list[str]  # request of row i of `tokens`
    rows: dict[str, int]  # request id -> its row of `tokens`
    tokens: torch.Tensor  # [num_sampled] int64 on the device
    host_tokens: torch.Tensor  # [num_sampled] int64, pinned on CUDA; valid once `done` fired
    done: torch.cuda.Event | None

    @classmethod
    def start(cls, result: StepResult, request_ids: list[str], tokens: torch.Tensor) -> PendingResult:
        """Start copying `tokens` to the host; marks the end of the plan's device work."""
        rows = {rid: i for i, rid in enumerate(request_ids)}
        if tokens.device.type != "cuda":
            return cls(result, request_ids, rows, tokens, tokens, None)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return cls(result, request_ids, rows, tokens, host, done)

    def row_of(self, request_id: str) -> int:
        row = self.rows.get(request_id)
        if row is None:
            raise RuntimeError(f"decode ahead of {request_id!r}: the previous plan sampled no token for it")
        return row

    def host_token(self, request_id: str) -> int:
        """The token sampled for `request_id` (waits for the device)."""
        self._wait_copy()
        return int(self.host_tokens[self.row_of(request_id)])

    def wait(self) -> StepResult:
        """The complete StepResult (waits for the plan's device work)."""
        self._wait_copy()
        self.result.sampled_token_ids = dict(zip(self.request_ids, self.host_tokens.tolist(), strict=True))
        return self.result

    def _wait_copy(self) -> None:
        if self.done is not None:
            self.done.synchronize()
