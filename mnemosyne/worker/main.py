"""Worker process entry point: `python -m mnemosyne.worker --driver tcp://HOST:PORT`.

The same entry point serves both launchers:

* the engine on one machine starts `world_size` of these as subprocesses, with
  RANK / WORLD_SIZE / LOCAL_RANK in their environment and a file:// rendezvous;
* `torchrun` starts them on every machine (env:// rendezvous from MASTER_ADDR and
  MASTER_PORT), pointed at a driver started with `--driver-address`.

The worker connects to the driver, receives the engine config, joins the process groups
(NCCL on CUDA, gloo on CPU), loads its model shard and runs plans (and the
benchmark-only synthetic KV fill, `FillSyntheticKV`) in order until told to stop (a
reporting rank launches plan n+1 before it reports plan n when n+1 arrives while n
still runs on the device, `_next_message`, unless n+1 launches eagerly after a decode-only
n, when n's tokens would wait for the whole launch, or the rank is a later pipeline stage,
whose launch can wait for the stage before: `Worker.reports_previous_first`). Any
exception is reported to the driver (`WorkerFailed`) before the process exits, so the
driver raises instead of waiting forever. From the moment it connects, a heartbeat
thread (`wire/heartbeat.py`) tells the driver it is alive, and ends the process if the
driver says so or (local workers, given `--parent-pid`) the parent is gone. Messages are
signed with the control secret from the environment (`wire/auth.py`).
"""

from __future__ import annotations

import argparse
import os
import socket
import threading
import time
import traceback
from typing import TYPE_CHECKING

import torch

from mnemosyne.gc_heap import prepare_to_serve
from mnemosyne.parallel.messages import (
    DriverMessage,
    FillSyntheticKV,
    InitWorker,
    RunStep,
    Shutdown,
    StepDone,
    WorkerFailed,
    WorkerHello,
    WorkerReady,
)
from mnemosyne.parallel.transport import WorkerChannel
from mnemosyne.wire.auth import require_secret
from mnemosyne.wire.heartbeat import Heartbeater

if TYPE_CHECKING:
    from mnemosyne.wire.plan import StepPlan
    from mnemosyne.worker.pending_result import PendingResult
    from mnemosyne.worker.worker import Worker

_TEARDOWN_TIMEOUT_S = 10.0
_SPIN_S = 20e-6  # between checks for the next plan or the device's end of the last one


def run_worker(
    driver: str,
    rank: int,
    local_rank: int,
    local_world_size: int,
    init_method: str,
    parent_pid: int | None = None,
) -> int:
    secret = require_secret("a worker")
    channel = WorkerChannel(driver, rank, secret)
    beater = Heartbeater(driver, f"rank-{rank}", secret, parent_pid).start()
    worker = None
    try:
        channel.send(WorkerHello(rank, socket.gethostname(), os.getpid()))
        init = channel.recv()
        if not isinstance(init, InitWorker):
            return 0  # the driver gave up before starting us (Shutdown)
        config = init.config
        if config.device.startswith("cuda"):
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world_size)))
        # Stage sends use dedicated two-rank groups (parallel/groups.py), so NCCL's eager-init
        # note that P2P ops are serialized with the other ops of their group does not apply.
        os.environ.setdefault("TORCH_NCCL_SHOW_EAGER_INIT_P2P_SERIALIZATION_WARNING", "false")
        from mnemosyne.parallel.groups import init_distributed
        from mnemosyne.worker.worker import Worker

        pg = init_distributed(config.parallel, rank, device, init_method, config.parallel.timeout_s)
        worker = Worker(config, pg, device)
        prepare_to_serve(f"worker rank {rank}")
        channel.send(WorkerReady(rank))
        pending: PendingResult | None = None  # the reporting rank's latest plan, not yet reported
        while True:
            msg = _next_message(channel, pending)
            if isinstance(msg, Shutdown):
                break
            if isinstance(msg, RunStep):
                pending = _run_plan(worker, channel, rank, msg.plan, pending)
            elif pending is not None:  # plan n's ids are on the host: report it
                channel.send(StepDone(rank, pending.wait()))
                pending = None
            if isinstance(msg, FillSyntheticKV):  # benchmark-only, after every earlier plan
                channel.send(worker.fill_synthetic_kv(msg.request_id, msg.seed))
            elif msg is not None and not isinstance(msg, RunStep):
                raise RuntimeError(f"unexpected driver message {type(msg).__name__} after start-up")
        worker.shutdown()
        return 0
    except BaseException:
        channel.send(WorkerFailed(rank, traceback.format_exc()))
        return 1
    finally:
        _teardown()
        beater.stop()
        channel.close()


def _run_plan(
    worker: Worker, channel: WorkerChannel, rank: int, plan: StepPlan, pending: PendingResult | None
) -> PendingResult | None:
    """Launch `plan` and report `pending` (the plan before it), in the order that keeps the
    device busy: plan n+1 first, then plan n's ids, unless `Worker.reports_previous_first`
    (plan n+1 launches eagerly after a decode-only plan n, or this is a later pipeline
    stage): then plan n's ids first, so they wait for no launch. Returns `plan`'s pending
    result (None off the reporting rank)."""
    if pending is not None and worker.reports_previous_first(plan):
        channel.send(StepDone(rank, pending.wait()))
        pending = None
    launched = worker.execute_async(plan)
    if pending is not None:
        channel.send(StepDone(rank, pending.wait()))
    return launched


def _next_message(channel: WorkerChannel, pending: PendingResult | None) -> DriverMessage | None:
    """The next driver message, or None once `pending`'s sampled ids are on the host (the
    driver may be waiting for them), whichever comes first.

    Async scheduling sends plan n+1 while plan n runs: a reporting rank that launched plan
    n takes plan n+1 as soon as it arrives and launches it before it waits for plan n's
    tokens, so the device never idles while this rank decodes the message, builds its
    sub-batch and reports plan n. On CPU every plan has run when it returns: reported at once.
    """
    if pending is None:
        return channel.recv()
    while not pending.ready():
        msg = channel.try_recv()
        if msg is not None:
            return msg
        time.sleep(_SPIN_S)
    return None


def _teardown() -> None:
    """Destroy the process group, but never hang on it (a peer may be gone)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    t = threading.Thread(target=dist.destroy_process_group, daemon=True)
    t.start()
    t.join(_TEARDOWN_TIMEOUT_S)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mnemosyne.worker", description=__doc__.splitlines()[0])
    ap.add_argument("--driver", required=True, help="driver address, tcp://HOST:PORT")
    ap.add_argument("--init-method", default="env://", help="torch.distributed rendezvous (default env://)")
    ap.add_argument("--parent-pid", type=int, default=None, help="exit when this parent process is gone")
    ns = ap.parse_args(argv)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    return run_worker(ns.driver, rank, local_rank, local_world, ns.init_method, ns.parent_pid)
