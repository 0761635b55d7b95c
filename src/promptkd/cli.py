"""The `promptkd` command: a thin layer over the stage functions.

Each stage module exposes `register(subparsers)`, which adds its sub-command and sets
`func(args) -> int | None`. Before any of them loads torch, OpenMP threads are told to sleep
rather than spin while they wait (promptkd.cpu), so a busy machine does not stall every command. User errors (PromptKDError, missing files, bad options) print one line
and exit with code 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from promptkd import __version__
from promptkd.cpu import use_passive_openmp
from promptkd.errors import PromptKDError

# Modules that contribute sub-commands, in the order `promptkd --help` lists them.
COMMAND_MODULES = [
    "promptkd.stages.teacher",
    "promptkd.stages.class_vectors",
    "promptkd.stages.cache",
    "promptkd.stages.distill",
    "promptkd.stages.evaluate",
    "promptkd.stages.export",
    "promptkd.stages.predict",
    "promptkd.stages.report",
    "promptkd.stages.import_official",
    "promptkd.stages.demo",
    "promptkd.toy.pretrain",
]


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2 (no usage dump)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="promptkd", description="Unsupervised prompt distillation of CLIP (PromptKD).")
    parser.add_argument("--version", action="version", version=f"promptkd {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors in the log")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # a stage not built yet
                continue
            raise
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    use_passive_openmp()  # before the stage modules load torch (promptkd.cpu says why)
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # --debug may appear anywhere on the line.
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    args = parser.parse_args(argv)
    # open_clip logs chatty INFO lines on the root logger: keep the root at WARNING and let only
    # promptkd's own loggers speak at INFO.
    logging.basicConfig(level=logging.INFO if debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s" if debug else "%(message)s")
    logging.getLogger("promptkd").setLevel(logging.WARNING if args.quiet else logging.INFO)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        code = args.func(args)
    except (PromptKDError, OSError) as e:  # OSError: missing files, permissions, a full disk
        if debug:
            raise
        message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"promptkd: error: {message}", file=sys.stderr)  # always one line
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print("promptkd: interrupted (the last checkpoint is kept; rerun with --resume)", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
