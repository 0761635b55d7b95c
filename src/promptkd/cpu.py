"""How promptkd shares CPU cores: OpenMP threads that wait for work sleep instead of spinning.

torch's CPU kernels run on OpenMP (libgomp in the Linux wheels). By default a libgomp thread that
reaches a barrier spins for ~300k iterations before sleeping. On a machine whose cores are also
busy with other processes, the partner thread it waits for is often descheduled, so every one of
the thousands of small parallel regions of a step burns a time slice spinning: a toy distillation
step went from ~40 ms to 0.3-3.6 s with one or two other CPU-bound processes (benchmarks/README.md,
"CPU contention"). With the passive policy a waiting thread sleeps at once and gives its core back.

This must happen before torch (and with it libgomp) is loaded, so the `promptkd` command calls
`use_passive_openmp()` first thing. A value the user set in the environment wins.
"""

from __future__ import annotations

import os
import sys

# OMP_WAIT_POLICY: libgomp and Intel OpenMP; KMP_BLOCKTIME: Intel OpenMP's spin time (ms), for
# builds that link it (the same effect there).
PASSIVE_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}
# Variables through which a user already chose how OpenMP threads wait.
USER_CHOICE_ENV = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def use_passive_openmp(environ=None) -> bool:
    """Set the passive OpenMP wait policy unless the user chose one; False when it is too late
    (torch already imported in this process) or the user's choice was kept."""
    env = os.environ if environ is None else environ
    if any(k in env for k in USER_CHOICE_ENV):
        return False
    env.update(PASSIVE_ENV)
    return "torch" not in sys.modules
