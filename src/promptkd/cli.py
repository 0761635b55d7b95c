"""The `promptkd` command: a thin layer over the stage functions.

Each command module exposes `register(subparsers)`, which adds its sub-command and sets
`func(args) -> int | None`. Building the parser imports no torch (stage modules import their heavy
libraries inside the functions that run), so `--help` answers at once.

User errors (PromptKDError, missing files, bad options) print one line and exit with code 2;
`--debug` shows the traceback instead. Ctrl-C at any moment prints one line and exits with 130.
Before any command loads torch, OpenMP threads are told to sleep rather than spin while they wait
(promptkd.cpu), so a busy machine does not stall every command.
"""

from __future__ import annotations

import sys

from promptkd.cpu import use_passive_openmp

# Modules that contribute sub-commands, in the order `promptkd --help` lists them.
COMMAND_MODULES = [
    "promptkd.stages.teacher",
    "promptkd.stages.class_vectors",
    "promptkd.stages.cache",
    "promptkd.stages.distill",
    "promptkd.stages.evaluate",
    "promptkd.stages.export",
    "promptkd.stages.predict",
    "promptkd.stages.info",
    "promptkd.stages.report",
    "promptkd.stages.sweep",
    "promptkd.stages.import_official",
    "promptkd.stages.demo",
    "promptkd.toy.commands",
]


def _parser_class():
    import argparse

    class Parser(argparse.ArgumentParser):
        """argparse, but a usage error is one line on stderr and exit code 2 (no usage dump)."""

        def error(self, message):
            self.exit(2, f"{self.prog}: error: {message}\n")

    return Parser


def _sub_parsers(parser):
    """The parsers of `parser`'s sub-commands, each once (aliases share a parser)."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from {id(p): p for p in action.choices.values()}.values()


def _add_globals_everywhere(parser) -> None:
    from promptkd.options import add_global_options

    for sub in _sub_parsers(parser):
        add_global_options(sub)
        _add_globals_everywhere(sub)


def build_parser():
    import importlib

    from promptkd import __version__
    from promptkd.options import add_global_options, fill_missing_help

    Parser = _parser_class()
    parser = Parser(prog="promptkd", description="Unsupervised prompt distillation of CLIP (PromptKD). "
                                                 "Options and run folders: docs/cli.md.")
    parser.add_argument("--version", action="version", version=f"promptkd {__version__}")
    add_global_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    _add_globals_everywhere(parser)
    fill_missing_help(parser)
    return parser


def _setup_logging(args) -> None:
    import logging

    # open_clip logs chatty INFO lines on the root logger: keep the root at WARNING and let only
    # promptkd's own loggers speak at INFO.
    logging.basicConfig(level=logging.INFO if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s" if args.debug else "%(message)s")
    logging.getLogger("promptkd").setLevel(logging.WARNING if args.quiet else logging.INFO)


def _one_line(e: BaseException) -> str:
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__


def _reader_left(program: bool) -> int:
    """The reader of our output closed the pipe (`promptkd predict DIR | head -3`): stop quietly, as
    Unix tools do, with the exit status of a process ended by SIGPIPE (128 + 13)."""
    import os

    if program:  # what is still buffered for stdout must not fail again at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return 141


def _interrupted(args) -> str:
    """One line; it advises --resume only where the command has it and left something to resume."""
    from pathlib import Path

    marker, out = getattr(args, "resume_marker", None), getattr(args, "out", None)
    if marker and out and (Path(out) / marker).is_file() and not _finished(Path(out)):
        return (f"promptkd: interrupted; {out} holds the last checkpoint: rerun the same command with --resume "
                "to continue")
    return "promptkd: interrupted"


def _finished(folder) -> bool:
    """Whether a run folder holds a finished run (an --overwrite interrupted before it removed it)."""
    from promptkd.runs import run_finished

    return run_finished(folder)


class _SigintWatch:
    """Ctrl-C, made to end in one line whatever it interrupts.

    SIGINT still raises KeyboardInterrupt, so the command unwinds (temporary files removed, the
    checkpoint kept). But a Ctrl-C can land where Python cannot raise it: inside a C extension's import
    (numpy's, under torch), where it surfaces as an ImportError, or inside a callback, where it is
    printed as "Exception ignored" and lost. The watch notes every SIGINT, delivers a lost one again,
    and a second Ctrl-C stops the program at once. As the program (not called from Python code), an
    interrupted run exits with 130 directly, and a late Ctrl-C while the interpreter shuts down is
    ignored, so neither becomes a traceback or a death by signal.
    """

    def __init__(self, program: bool):
        import signal

        from promptkd.errors import note_interrupt

        self.program, self.seen, self.redeliver = program, 0, False
        self.previous = self.unraisable = None
        note_interrupt(reset=True)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not under a caller's handler
            self.previous = signal.signal(signal.SIGINT, self._handle)
            self.unraisable, sys.unraisablehook = sys.unraisablehook, self._unraisable

    def _handle(self, signum, frame):
        import os

        from promptkd.errors import note_interrupt

        self.seen += 1
        note_interrupt()
        if self.seen > 1 and self.program and not self.redeliver:
            print("promptkd: interrupted", file=sys.stderr, flush=True)
            os._exit(130)
        self.redeliver = False
        raise KeyboardInterrupt

    def _unraisable(self, info) -> None:
        if issubclass(info.exc_type, KeyboardInterrupt):  # raised inside a callback: deliver it again
            import _thread

            self.redeliver = True
            _thread.interrupt_main()
            return
        self.unraisable(info)

    def close(self, interrupted: bool) -> None:
        import os
        import signal

        from promptkd.errors import note_interrupt

        note_interrupt(reset=True)  # the count is this command's (main() may be called again)
        if self.previous is None:
            return
        sys.unraisablehook = self.unraisable
        signal.signal(signal.SIGINT, signal.SIG_IGN if self.program else self.previous)
        if interrupted and self.program:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)


def main(argv: list[str] | None = None) -> int:
    """The `promptkd` command (argv None: sys.argv, as the program; a list: called from Python)."""
    use_passive_openmp()  # before any command module loads torch (promptkd.cpu says why)
    import warnings

    # A Ctrl-C inside numpy's import under torch makes torch import numpy again, which warns; the
    # interrupt is reported in its one line instead.
    warnings.filterwarnings("ignore", message="The NumPy module was reloaded")
    program = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # known before parsing, for an interrupt while the parser is built
    args, watch, interrupted = None, _SigintWatch(program), False
    try:
        from promptkd import runs
        from promptkd.errors import PromptKDError

        runs.COMMAND_LINE = ["promptkd", *argv]
        parser = build_parser()
        args = parser.parse_args(argv)
        debug = args.debug
        _setup_logging(args)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        try:
            if args.device not in (None, "auto", "cpu"):  # a device that is not here: one line, before any work
                from promptkd.engine.loop import resolve_device

                resolve_device(args.device)
            code = args.func(args)
            if watch.seen:  # a Ctrl-C that some code swallowed: still an interrupted command
                raise KeyboardInterrupt
            if program:
                sys.stdout.flush()  # a reader that left early (`| head`) is found here, not at exit
        except BrokenPipeError:
            return _reader_left(program)
        except (PromptKDError, OSError, MemoryError) as e:  # OSError: missing files, permissions, a full disk
            if debug or watch.seen:
                raise
            print(f"promptkd: error: {_one_line(e)}", file=sys.stderr)  # always one line
            return 2
        except RuntimeError as e:
            if debug or type(e).__name__ != "OutOfMemoryError":  # torch.cuda.OutOfMemoryError
                raise
            print(f"promptkd: error: out of device memory ({_one_line(e)[:160]}); try a smaller --batch-size",
                  file=sys.stderr)
            return 2
        return int(code or 0)
    except BaseException as e:
        # Ctrl-C, also when it surfaced as another error (an import it cut short)
        interrupted = isinstance(e, KeyboardInterrupt) or (watch.seen and not isinstance(e, SystemExit))
        if debug or not interrupted:
            raise
        print(_interrupted(args), file=sys.stderr)
        return 130
    finally:
        if "promptkd.runs" in sys.modules:
            sys.modules["promptkd.runs"].release_folders()  # one writer per run folder, for this command's life
        watch.close(interrupted)


if __name__ == "__main__":
    sys.exit(main())
