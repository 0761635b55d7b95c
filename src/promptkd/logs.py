"""Logging helpers shared by model loading and the toy models."""

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
