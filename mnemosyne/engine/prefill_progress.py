"""A log line every few seconds while a long prompt prefills: tokens done, rate, predicted TTFT.

    prefill req-7: 131072/262144 tokens (50.0%), 7412 tok/s, TTFT in ~17.3 s (predicted)

Fed every output in the engine core (`engine/core.py`); only prompts of at least `min_prompt_tokens`
are followed, and each at most once per `interval_s`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from mnemosyne.outputs import RequestOutput

logger = logging.getLogger("mnemosyne.prefill")


class PrefillProgressLog:
    def __init__(
        self,
        predicted_remaining_s: Callable[[str], float | None],
        min_prompt_tokens: int = 32768,
        interval_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.predicted_remaining_s = predicted_remaining_s
        self.min_prompt_tokens = min_prompt_tokens
        self.interval_s = interval_s
        self._clock = clock
        self._last_log: dict[str, float] = {}

    def on_output(self, out: RequestOutput) -> str | None:
        """Log (and return) a progress line for this output if one is due."""
        num_prompt = len(out.prompt_token_ids)
        if out.finished or out.token_ids or num_prompt < self.min_prompt_tokens:
            self._last_log.pop(out.request_id, None)
            return None
        now = self._clock()
        if now - self._last_log.get(out.request_id, out.timing.arrival_time) < self.interval_s:
            return None
        self._last_log[out.request_id] = now
        done = out.num_computed_tokens
        rate = done / max(now - out.timing.arrival_time, 1e-9)
        remaining = self.predicted_remaining_s(out.request_id)
        ttft = "unknown" if remaining is None else f"~{remaining:.1f} s (predicted)"
        line = (
            f"prefill {out.request_id}: {done}/{num_prompt} tokens ({100 * done / num_prompt:.1f}%), "
            f"{rate:.0f} tok/s, TTFT in {ttft}"
        )
        logger.info(line)
        return line
