"""What promptkd shows on stderr besides errors: logging helpers and progress bars."""

from __future__ import annotations

import contextlib
import logging


@contextlib.contextmanager
def quiet_open_clip():
    """Silence open_clip's root-logger chatter while building a model whose weights we load
    ourselves (it would otherwise warn 'No pretrained weights loaded ... initialized randomly')."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def progress_bar(iterable=None, *, enabled: bool = True, **kwargs):
    """A tqdm bar on stderr, drawn only when stderr is a terminal: in a log file or a pipe, its
    carriage-return redraws would be noise (tqdm's disable=None). `enabled=False` (--no-progress)
    turns it off everywhere."""
    import sys

    from tqdm.auto import tqdm

    return tqdm(iterable, disable=None if enabled else True, file=sys.stderr, dynamic_ncols=True, **kwargs)
