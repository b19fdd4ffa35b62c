"""Start worker processes on this machine: one `python -m mnemosyne.worker` per device.

Workers are fresh interpreters (spawn semantics, never fork), started through the
same entry point torchrun uses, so the user's script is never re-imported in a
worker and both launchers run identical code. Rendezvous is a file:// store in a
private temporary directory (no port to race for). Workers get the control secret
in their environment (readable only by this user) and this process's pid, so they
exit if it dies without stopping them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from mnemosyne.wire.auth import secret_env


@dataclass
class LocalWorkers:
    procs: list[subprocess.Popen]
    tmpdir: tempfile.TemporaryDirectory = field(repr=False)

    def dead(self) -> list[tuple[int, int]]:
        """(rank, exit code) of every worker that has exited."""
        return [(r, p.returncode) for r, p in enumerate(self.procs) if p.poll() is not None]

    def wait(self, timeout_s: float) -> None:
        """Wait for every worker to exit; kill what is left after `timeout_s`."""
        for p in self.procs:
            try:
                p.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.tmpdir.cleanup()

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            p.wait()
        self.tmpdir.cleanup()


def launch_local_workers(world_size: int, driver_address: str, secret: bytes) -> LocalWorkers:
    tmpdir = tempfile.TemporaryDirectory(prefix="mnemosyne-rdzv-")
    init_method = (Path(tmpdir.name) / "store").as_uri()
    procs = []
    for rank in range(world_size):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_WORLD_SIZE=str(world_size),
            **secret_env(secret),
        )
        cmd = [
            sys.executable,
            "-m",
            "mnemosyne.worker",
            "--driver",
            driver_address,
            "--init-method",
            init_method,
            "--parent-pid",
            str(os.getpid()),
        ]
        procs.append(subprocess.Popen(cmd, env=env))
    return LocalWorkers(procs, tmpdir)
