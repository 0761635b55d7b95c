"""Wall time of a promptkd workload on an idle CPU and with other CPU-bound processes running.

For each OpenMP wait policy and each number of busy processes (`yes > /dev/null`, one core each),
the workload runs once in a fresh process and its wall time is compared with the same policy's
idle time (0 busy processes). Target (issue #16): with one busy process at most 2.5x the idle
time (a fair share of a 2-core machine alone is 2x).

Workloads:
- `demo`: `promptkd demo` at full size, what `make demo` runs (a couple of minutes per run idle);
- `steps`: 40 toy distillation steps (toy-student, batch 32, KL against fixed teacher logits),
  seconds per run, for choosing a policy quickly.

Policies:
- `passive`: what the `promptkd` command does (promptkd.cpu: OMP_WAIT_POLICY=PASSIVE);
- `spin`: libgomp's default without a policy (GOMP_SPINCOUNT=300000), what it did before;
- `one-thread`: passive and OMP_NUM_THREADS=1.

    python benchmarks/contention.py                                   # demo: passive, 0/1/2 busy
    python benchmarks/contention.py --workload steps --policies passive spin one-thread
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

POLICIES = {
    "passive": {},
    "spin": {"GOMP_SPINCOUNT": "300000"},  # libgomp's default spin count when no policy is set
    "one-thread": {"OMP_NUM_THREADS": "1"},
}


def _child_steps(steps: int) -> None:
    """The `steps` workload, run in its own process (the policy must precede importing torch)."""
    from promptkd.cpu import use_passive_openmp

    use_passive_openmp()
    import torch
    import torch.nn.functional as F

    from promptkd.models import load_clip
    from promptkd.models.wrappers import Student

    torch.manual_seed(0)
    student = Student(load_clip("toy-student"), 128, 3, 8)
    opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    W = F.normalize(torch.randn(24, 128), dim=-1)
    x, target = torch.randn(32, 3, 48, 48), torch.randn(32, 24).log_softmax(-1)
    for _ in range(steps):
        logits = 10 * F.normalize(student(x), dim=-1) @ W.T
        loss = F.kl_div(logits.log_softmax(-1), target, log_target=True, reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        opt.step()


def _command(workload: str, out: Path, quick: bool = False) -> list[str]:
    if workload == "demo":
        return [sys.executable, "-m", "promptkd.cli", "demo", "--out", str(out), "--no-progress",
                *(["--quick"] if quick else [])]
    return [sys.executable, __file__, "--child-steps", "40"]


def _run_once(workload: str, policy: str, busy: int, timeout: float, tmp: Path,
              quick: bool = False) -> tuple[float | None, float]:
    """(wall seconds or None on timeout, load average before the run)."""
    from promptkd.cpu import USER_CHOICE_ENV

    env = {k: v for k, v in os.environ.items() if k not in (*USER_CHOICE_ENV, "OMP_NUM_THREADS")}
    env.update(POLICIES[policy])
    hogs = [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) for _ in range(busy)]
    try:
        time.sleep(0.5 if busy else 0)
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        proc = subprocess.Popen(_command(workload, tmp / f"{policy}-{busy}", quick), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True)
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return None, load
        if proc.returncode:
            raise SystemExit(f"{workload} failed ({proc.returncode}): {err.decode()[-2000:]}")
        return time.perf_counter() - t0, load
    finally:
        for h in hogs:
            h.kill()
            h.wait()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", choices=("demo", "steps"), default="demo")
    p.add_argument("--policies", nargs="+", choices=tuple(POLICIES), default=["passive"])
    p.add_argument("--busy", nargs="+", type=int, default=[0, 1, 2], help="numbers of `yes` processes to run")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--timeout", type=float, default=1800, help="seconds before a run is stopped and reported as such")
    p.add_argument("--quick", action="store_true", help="demo workload at `promptkd demo --quick` size (a smoke test)")
    p.add_argument("--child-steps", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child_steps:
        _child_steps(a.child_steps)
        return 0
    print(f"machine: {os.cpu_count()} CPUs, {platform.machine()}, {platform.processor() or platform.platform()}; "
          f"workload {a.workload}; load average before start {os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(a.repeats):
            for policy in a.policies:
                for busy in a.busy:
                    wall, load = _run_once(a.workload, policy, busy, a.timeout, Path(tmp), a.quick)
                    rows.append((policy, busy, wall, load))
                    shown = f"{wall:.1f} s" if wall is not None else f"> {a.timeout:.0f} s (stopped)"
                    print(f"  {policy:10s} busy={busy}: {shown} (load before {load:.2f})", flush=True)
    print("\n| policy | busy processes | wall time (s) | x idle | load average before |\n|---|---|---|---|---|")
    for policy, busy, wall, load in rows:
        idle = [w for p_, b, w, _ in rows if p_ == policy and b == 0 and w is not None]
        base = sum(idle) / len(idle) if idle else None
        ratio = f"{wall / base:.2f}x" if wall is not None and base else "-"
        shown = f"{wall:.1f}" if wall is not None else f"> {a.timeout:.0f}"
        print(f"| {policy} | {busy} | {shown} | {ratio} | {load:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
