"""Fixtures of the CLI tests: tiny CLIPs named by files, a labelled folder, and a teacher and a
student run made by the CLI itself (see cli_helpers)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_helpers import Clips, Runs, distill_command, make_clips, teacher_command
from tinyclip import write_images

from promptkd.cli import main


@pytest.fixture(scope="session")
def clips(tmp_path_factory) -> Clips:
    torch.set_num_threads(1)  # session fixtures run before the per-test thread setting
    return make_clips(tmp_path_factory.mktemp("clips"))


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Path:
    """A labelled folder with train/ val/ test/ of 4 colour classes."""
    root = tmp_path_factory.mktemp("data") / "colours"
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        write_images(root / split, n, seed=len(split))
    return root


@pytest.fixture(scope="session")
def runs(clips, data, tmp_path_factory) -> Runs:
    """Read-only: tests that change a run use own_runs."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("runs")
    assert main(teacher_command(clips, data, root / "teacher")) == 0
    assert main(distill_command(clips, data, root / "teacher", root / "student")) == 0
    return Runs(root / "teacher", root / "student")


@pytest.fixture
def own_runs(data, tmp_path) -> tuple[Clips, Runs]:
    """CLIP files and runs of this test alone (it may move or change them)."""
    clips = make_clips(tmp_path / "clips")
    assert main(teacher_command(clips, data, tmp_path / "teacher")) == 0
    assert main(distill_command(clips, data, tmp_path / "teacher", tmp_path / "student")) == 0
    return clips, Runs(tmp_path / "teacher", tmp_path / "student")
