"""Fixtures of the reliability tests: one tiny world on disk, shared by the whole session."""

from __future__ import annotations

import pytest
from reliability_helpers import make_world


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """Tiny teacher/student CLIPs with weights files, a teacher artifact and a labelled folder.

    Read-only: tests that damage files copy them first.
    """
    return make_world(tmp_path_factory.mktemp("world"))
