"""Issue #23: one writer per run folder. Two `distill` runs into one --out both ended with exit 0,
and the folder held the second run's student while the first had printed its own result. A run now
holds an exclusive OS lock (flock) on its folder for its whole life; a SIGKILL releases it."""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import subprocess
import sys

from reliability_helpers import HERE, start_killable, wait_until_ready
from tinyclip import one_line

from promptkd.cli import main


def _cli(argv: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "promptkd.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=HERE, **kwargs)


def test_a_busy_folder_is_refused_at_once_and_a_killed_holder_is_taken_over(world, tmp_path):
    out, ready = tmp_path / "run", tmp_path / "ready"
    holder = start_killable(["-q", *world.distill_args(out, "--checkpoint-every", "2")], "checkpoint:1", ready)
    wait_until_ready(holder, ready, timeout=120)  # it holds the folder, blocked after its first checkpoint
    checkpoint = hashlib.sha256((out / "checkpoint.safetensors").read_bytes()).hexdigest()
    for extra in ([], ["--overwrite"], ["--resume"]):
        second = _cli(["-q", *world.distill_args(out, *extra)])
        stdout, err = second.communicate(timeout=120)
        assert second.returncode == 2, err
        err = one_line(err)
        assert err.startswith(f"promptkd: error: --out {out} is in use by another promptkd run (PID {holder.pid} on "
                              f"{socket.gethostname()}, started 20"), err
        assert "distill" in err and err.endswith("wait for it to end or choose another --out"), err
    assert hashlib.sha256((out / "checkpoint.safetensors").read_bytes()).hexdigest() == checkpoint
    holder.send_signal(signal.SIGKILL)  # kill -9: no code of the holder runs, its lock file stays
    holder.wait(timeout=30)
    holder.stdout.close()
    assert json.loads((out / ".promptkd.lock").read_text())["pid"] == holder.pid
    assert main(["-q", *world.distill_args(out), "--resume"]) == 0  # the OS released the lock: taken over
    assert (out / "student.safetensors").is_file()


def test_two_runs_started_together_exactly_one_proceeds(world, tmp_path):
    """Started as separate processes at the same moment (seeds 1 and 2, so their students differ):
    one finishes, the other is refused in one line, and the folder holds the finisher's run."""
    out = tmp_path / "run"
    procs = {seed: _cli(["-q", *world.distill_args(out, "--seed", str(seed), "--no-baseline")]) for seed in (1, 2)}
    results = {seed: (p.wait(timeout=300), *p.communicate()) for seed, p in procs.items()}
    codes = sorted(code for code, _, _ in results.values())
    assert codes == [0, 2], results
    winner = next(seed for seed, (code, _, _) in results.items() if code == 0)
    loser_err = one_line(next(err for code, _, err in results.values() if code == 2))
    # where the loser met the folder decides the words: busy (most often), or already finished
    assert "is in use by another promptkd run" in loser_err or "already holds a finished" in loser_err, loser_err
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "finished" and f"--seed {winner}" in record["command_line"]
    assert json.loads((out / "metrics.json").read_text())["config"]["train"]["seed"] == winner


def test_a_forked_worker_does_not_keep_a_killed_runs_folder_locked(tmp_path):
    """DataLoader workers are forked: a worker still exiting after its run was killed must not hold
    the run's lock (a flock lives as long as any process keeps a descriptor of it)."""
    import fcntl
    import os
    import time

    from promptkd import runs

    runs.lock_folder(tmp_path)
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # the worker: alive, doing nothing
        os.write(write, b"up")
        time.sleep(60)
        os._exit(0)
    try:
        assert os.read(read, 2) == b"up"
        runs.release_folders()  # the run itself is gone
        fd = os.open(tmp_path / runs.LOCK_FILE, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free although the worker lives
        os.close(fd)
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        os.close(read)
        os.close(write)
