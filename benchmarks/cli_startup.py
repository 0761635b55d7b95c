#!/usr/bin/env python
"""Start-up time of the promptkd CLI: `promptkd --help` and `promptkd COMMAND --help`, each in a
fresh process, beside two references measured in the same run: the bare interpreter
(`python -c pass`) and `python -c "import torch"` (what every --help cost when the parser
imported the stages' libraries).

    python benchmarks/cli_startup.py              # 7 runs per line, median; markdown table
    python benchmarks/cli_startup.py --runs 15 --json

Runs are interleaved (one of each line per round), so a busy machine slows every line alike and
the ratios stay meaningful.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time

COMMANDS = ["teacher", "class-vectors", "cache", "distill", "eval", "export", "predict", "report",
            "import-official", "demo", "toy pretrain"]


def lines() -> dict[str, list[str]]:
    py = [sys.executable]
    out = {"python -c pass (interpreter)": [*py, "-c", "pass"],
           'python -c "import torch"': [*py, "-c", "import torch"],
           "promptkd --help": [*py, "-m", "promptkd.cli", "--help"]}
    out.update({f"promptkd {c} --help": [*py, "-m", "promptkd.cli", *c.split(), "--help"] for c in COMMANDS})
    return out


def measure(runs: int) -> dict[str, dict]:
    todo = lines()
    times: dict[str, list[float]] = {name: [] for name in todo}
    for argv in todo.values():  # warm the file cache and the .pyc files once
        subprocess.run(argv, capture_output=True, check=True)
    for _ in range(runs):
        for name, argv in todo.items():
            t0 = time.perf_counter()
            subprocess.run(argv, capture_output=True, check=True)
            times[name].append(time.perf_counter() - t0)
    return {name: {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts)} for name, ts in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    results = measure(args.runs)
    if args.json:
        print(json.dumps({"machine": platform.processor() or platform.machine(), "runs": args.runs,
                          "results": results}, indent=2))
        return 0
    torch_s = results['python -c "import torch"']["median_s"]
    print(f"{args.runs} runs per line, median (min-max); {platform.machine()}, Python {platform.python_version()}\n")
    print("| command | seconds | vs `import torch` |\n|---|---|---|")
    for name, r in results.items():
        print(f"| `{name}` | {r['median_s']:.3f} ({r['min_s']:.3f}-{r['max_s']:.3f}) | {r['median_s'] / torch_s:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
