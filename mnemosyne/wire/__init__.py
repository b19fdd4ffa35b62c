"""What crosses a process boundary: typed, versioned, authenticated messages.

Shared by every process (API server, engine core, workers), so it sits low in the
import graph: it imports only `config`, `sampling_params`, `request` and `outputs`.

* `auth.py`: the per-launch secret (32 random bytes) and how child processes get it.
* `codec.py`: msgspec encoding + HMAC-SHA256 framing; rejected frames are counted.
* `plan.py`: `StepPlan` and `StepResult`, the driver <-> worker payloads.
* `heartbeat.py`: a thread that beats independently of compute.
* `engine_core.py`: API server <-> engine core messages.
"""
