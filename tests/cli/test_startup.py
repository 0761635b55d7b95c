"""`promptkd --help` and `promptkd COMMAND --help` import no torch, torchvision or open_clip: the
parser is built from light modules only (the stages import their heavy libraries when they run).
Behavioural, not timed: benchmarks/cli_startup.py measures the time."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "torchvision", "open_clip", "numpy", "PIL", "safetensors", "matplotlib")

PROBE = """
import contextlib, io, json, sys
from promptkd.cli import build_parser, main
parser = build_parser()
sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
lines = [["--help"], *[[c, "--help"] for c in sub.choices], ["toy", "pretrain", "--help"]]
for argv in lines:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            main(argv)
        except SystemExit as e:
            assert e.code == 0, (argv, e.code)
    assert "usage: promptkd" in out.getvalue(), argv
print(json.dumps({"commands": sorted(sub.choices), "heavy": [m for m in HEAVY if m in sys.modules]}))
"""


def test_help_of_every_command_imports_no_heavy_library():
    done = subprocess.run([sys.executable, "-c", f"HEAVY = {HEAVY!r}\n{PROBE}"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(result["commands"]) >= 11
    assert result["heavy"] == []


def test_the_installed_entry_point_imports_no_torch_for_help():
    """The real `python -m promptkd.cli distill --help`, traced with -X importtime."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "promptkd.cli", "distill", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--teacher-weights" in done.stdout
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in done.stderr.splitlines() if "|" in line}
    assert "promptkd" in imported and not imported & set(HEAVY)
