"""Decode aheads: the scheduler's side of async scheduling (the workers': worker/decode_ahead.py).

Async scheduling (`config.async_scheduling`, layouts with spp == 1: one device or tp x kvp
worker processes): the engine schedules step n+1 before it has processed step n. A
running request whose sampling chunk is in step n has every token dispatched
(num_pending == 0) and may still get a *decode ahead* in step n+1: the chunk
[num_tokens, num_tokens + 1), whose input token is the one step n samples, taken on the
device (wire/plan.py UNRESOLVED_TOKEN_ID; with several ranks the sampling group's
reporting rank shares it through one all-reduce, worker/decode_ahead.py, as the decode
ahead may sit on another KVP group)::

    (num_tokens = T: positions 0..T-1 known; tok@p = the token at position p)
    step n   (in flight)   chunk [T-1, T)   samples tok@T       num_computed = T-1, dispatched = T
    step n+1 (scheduled)   chunk [T, T+1)   input tok@T (?)  -> dispatched = T+1 = num_tokens + 1
    process n              append tok@T: num_tokens = T+1, num_computed = T (dispatched == num_tokens)
    step n+2 (scheduled)   chunk [T+1, T+2) input tok@T+1 (?)  ...

A decode ahead is scheduled only if tok@T cannot end the request by length
(num_output + 1 < max_tokens and num_tokens + 1 < max_model_len), so no decode past
those limits is ever run (`can_decode_ahead`). When step n ends the request otherwise
(eos, stop ids, a stop string, abort), step n+1's chunk is stale: the scheduler's
`update_from_output` drops it (its request is no longer running), its token is never
emitted, and the KV slot it wrote went with the request's freed blocks (plans run in
order, so that write lands before any later owner of the block writes). A request with
work in flight may be preempted like any request not scheduled in the current step: its
in-flight chunks are then dropped as stale (epoch), and their tokens recomputed.
"""

from __future__ import annotations

from mnemosyne.config import SchedulerConfig
from mnemosyne.request import Request


def can_decode_ahead(req: Request, config: SchedulerConfig) -> bool:
    """With async scheduling: may `req` decode the token its in-flight chunk samples?

    Only when that token is unknown here (every token dispatched, some not yet
    computed: the last dispatched chunk samples and is in flight), at most one such
    token per request, and only if that token cannot finish the request by length:
    a decode is never scheduled past max_tokens or max_model_len."""
    return (
        config.async_scheduling
        and req.num_dispatched_tokens == req.num_tokens
        and req.num_computed_tokens < req.num_dispatched_tokens
        and req.num_output_tokens + 1 < req.sampling_params.max_tokens
        and req.num_tokens + 1 < config.max_model_len
    )
