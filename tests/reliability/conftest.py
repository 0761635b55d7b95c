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


@pytest.fixture
def student_run(world, tmp_path):
    """A student run folder (student + class vectors) on the world's CLIPs."""
    from promptkd.models import load_clip
    from promptkd.models.wrappers import ClassVectors, Student, Teacher

    folder = tmp_path / "student"
    Student(load_clip(str(world.student_cfg), str(world.student_weights)), 32, 1, 2).save(folder / "student.safetensors")
    teacher = Teacher.load(world.teacher)
    ClassVectors(teacher.encode_classnames(["red", "green"]).detach(), ["red", "green"], teacher.identity()).save(
        folder / "class_vectors.safetensors")
    return folder
