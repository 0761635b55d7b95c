"""Start a promptkd command (or a script) under torchrun on this machine, as a user would: one node
with N processes, or several nodes (one torchrun launch each) meeting at a c10d rendezvous on
127.0.0.1. CPU and gloo, one thread per process.

With several nodes the rendezvous store lives in the test process, not in one of the launches:
torchrun's agent that hosts it takes it down when its own workers end, and another node's agent
still polling it then fails (RendezvousConnectionError) although its workers succeeded. A store
that outlives every launch, as a cluster's head service does, leaves only the command's own result."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_lines(target: list[str], *, nproc: int = 1, nnodes: int = 1, port: int | None = None,
                   store_elsewhere: bool = False) -> list[list[str]]:
    """The command line of each launch (one per node). `target`: ["-m", "promptkd.cli", ...] or a script.
    `store_elsewhere`: no launch hosts the rendezvous store (`rendezvous_store` does)."""
    run = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    if nnodes == 1:
        return [[*run, "--standalone", *target]]
    port = port or free_port()
    host = ["--rdzv-conf=is_host=false"] if store_elsewhere else []
    return [[*run, f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
             "--rdzv-id=promptkd-test", *host, *target] for _ in range(nnodes)]


def rendezvous_store(port: int):
    """A c10d store server on 127.0.0.1:`port` for the launches to meet at; it lives as long as the
    returned object is referenced."""
    from datetime import timedelta

    from torch.distributed import TCPStore

    return TCPStore("127.0.0.1", port, is_master=True, multi_tenant=True, wait_for_workers=False,
                    timeout=timedelta(seconds=300))


def launch_env(extra: dict | None = None) -> dict:
    path = os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **(extra or {})}


def torchrun(target: list[str], *, nproc: int = 1, nnodes: int = 1, timeout: float = 300) -> list[str]:
    """Run all launches at once and wait; every launch must succeed. Returns their outputs."""
    port = free_port() if nnodes > 1 else None
    store = rendezvous_store(port) if port else None  # noqa: F841 (kept alive until every launch ends)
    procs = [subprocess.Popen(cmd, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cmd in torchrun_lines(target, nproc=nproc, nnodes=nnodes, port=port, store_elsewhere=True)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
    return outs


def cli(*args: str) -> list[str]:
    """The torchrun target that runs `promptkd ARGS`."""
    return ["-m", "promptkd.cli", *args]
