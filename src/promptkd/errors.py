"""One exception type for every user-facing failure, so the CLI can print one line and exit 2."""


class PromptKDError(Exception):
    """A problem with the user's input, files or configuration (not a bug in promptkd)."""


# Ctrl-C presses the CLI has seen in this command (promptkd.cli's watch counts them). A Ctrl-C can
# surface as another error (an import it cut short raises ImportError); code that would go on
# after such an error (an optional package "not installed", an image "unreadable") asks here first.
_interrupts = [0]


def note_interrupt(reset: bool = False) -> None:
    _interrupts[0] = 0 if reset else _interrupts[0] + 1


def raise_if_interrupted() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was pressed: call it where an exception is about to be
    swallowed, so an interrupt that surfaced as that exception is not lost."""
    if _interrupts[0]:
        raise KeyboardInterrupt


def optional_import(name: str):
    """The module `name`, or None when it is not installed (never when a Ctrl-C cut its import short)."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        raise_if_interrupted()
        return None
