"""The promptkd CLI, for tests that SIGKILL it: `python killable.py <promptkd arguments>`.

Numerics are untouched; with RELIABILITY_DELAY=s the run sleeps s seconds after each progress
event (a training step logged to metrics.jsonl, a cache shard listed in manifest.json), so the
test can kill it at a chosen step, anywhere inside the next one.
"""

import os
import sys
import time

import torch

torch.set_num_threads(1)
delay = float(os.environ.get("RELIABILITY_DELAY", "0"))

if delay:
    from promptkd.engine import loop

    real_write = loop.MetricsLog.write

    def slow_write(self, record):
        real_write(self, record)
        if record.get("event") == "step":
            time.sleep(delay)

    loop.MetricsLog.write = slow_write

    try:
        from promptkd.stages import cache
    except ImportError:
        cache = None
    if cache is not None:
        real_json = cache.write_json

        def slow_json(path, obj):
            real_json(path, obj)
            time.sleep(delay)

        cache.write_json = slow_json

from promptkd.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
