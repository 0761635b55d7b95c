"""The promptkd CLI, for tests that SIGKILL it: `python killable.py <promptkd arguments>`.

Numerics are untouched. With RELIABILITY_STOP=EVENT:N the run stops at the N-th EVENT, creates the
file named by RELIABILITY_READY and blocks until it is killed, so the test's SIGKILL lands exactly
there on any machine, fast or slow. EVENT is one of:

- step: the N-th training step's record has reached metrics.jsonl (a checkpoint due after that
  step is not written yet)
- torn: half of the N-th step's record is in metrics.jsonl (a kill in the middle of an append)
- epoch: the N-th epoch's record has reached metrics.jsonl (its end-of-epoch work, e.g. the GPA
  update, is done in memory; its checkpoint is not written yet)
- checkpoint: the N-th checkpoint (mid-epoch or end of epoch) has been written
- shard: the teacher-cache manifest has been rewritten for the N-th time (one more shard listed)
- call: RELIABILITY_STOP=call:MODULE.FUNCTION:N stops when MODULE.FUNCTION is called for the N-th
  time, before it runs (e.g. call:promptkd.stages.export.parity:1, call:os.replace:1). The module's
  attribute is replaced, so a caller that looks it up when it calls (promptkd's all do) stops there.

A Ctrl-C (SIGINT) sent to a blocked run interrupts it there, as a kill would.
"""

import json
import os
import sys
import time

import torch

torch.set_num_threads(1)
EVENT, _, N = os.environ.get("RELIABILITY_STOP", "").partition(":")
READY = os.environ.get("RELIABILITY_READY", "")
seen: dict[str, int] = {}


def reached(event: str) -> bool:
    """Count one `event`; True when it is the chosen kill point."""
    seen[event] = seen.get(event, 0) + 1
    return event == EVENT and seen[event] == int(N)


def stop_here() -> None:
    with open(READY, "w") as f:
        f.write(f"{EVENT}:{N}\n")
    while True:  # until SIGKILL
        time.sleep(60)


if EVENT == "call":
    import importlib

    TARGET, _, N = N.rpartition(":")
    module, _, name = TARGET.rpartition(".")
    owner = importlib.import_module(module)
    real_call = getattr(owner, name)

    def call(*args, **kwargs):
        if reached("call"):
            stop_here()
        return real_call(*args, **kwargs)

    setattr(owner, name, call)
elif EVENT:
    from promptkd.engine import loop

    real_write, real_save = loop.MetricsLog.write, loop.save_checkpoint

    def write(self, record):
        kind = record.get("event")
        if EVENT == "torn" and kind == "step" and reached("torn"):
            line = json.dumps(record) + "\n"
            self.file.write(line[: len(line) // 2])
            self.file.flush()
            stop_here()
        real_write(self, record)
        if kind == EVENT and reached(kind):
            stop_here()

    def save_checkpoint(*args, **kwargs):
        real_save(*args, **kwargs)
        if EVENT == "checkpoint" and reached("checkpoint"):
            stop_here()

    loop.MetricsLog.write = write
    loop.save_checkpoint = save_checkpoint

    if EVENT == "shard":
        from promptkd.stages import cache

        real_json = cache.write_json

        def write_json(path, obj):
            real_json(path, obj)
            if os.path.basename(path) == "manifest.json" and reached("shard"):
                stop_here()

        cache.write_json = write_json

from promptkd.cli import main  # noqa: E402

sys.exit(main())  # as the installed command runs it (argv from sys.argv)
