#!/usr/bin/env python
"""Moved: the paper's sweep is now `promptkd sweep` (docs/distill.md, "Reproducing the paper").

This shim keeps old command lines working: `--data` is `--root`, everything else is passed on.

    python scripts/reproduce_paper.py --data $DATA --teachers teachers --out runs/paper --dry-run
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from promptkd.cli import main  # noqa: E402

if __name__ == "__main__":
    argv = ["--root" if a == "--data" else a for a in sys.argv[1:]]
    print("scripts/reproduce_paper.py is now `promptkd sweep`", file=sys.stderr)
    sys.exit(main(["sweep", *argv]))
