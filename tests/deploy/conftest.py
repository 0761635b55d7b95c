"""Tiny teacher, student and class-vector files for the deployment tests."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from PIL import Image

from promptkd.models import load_clip
from promptkd.models.wrappers import ClassVectors, Student, Teacher

CLASSNAMES = ["cat", "dog", "red fox", "tabby_cat"]


@pytest.fixture
def tiny_kd(tiny_configs, tmp_path):
    """In-memory models and their saved files (the CLIP weights are random, so reloads need `clip=`)."""
    t_cfg, s_cfg = tiny_configs
    teacher = Teacher(load_clip(str(t_cfg)), 2, 2, 2, 4)
    student = Student(load_clip(str(s_cfg)), teacher.dim, 2, 2)
    cv = ClassVectors(teacher.encode_classnames(CLASSNAMES).detach(), CLASSNAMES, teacher.identity())
    paths = SimpleNamespace(teacher=tmp_path / "teacher.safetensors", student=tmp_path / "student.safetensors",
                            classes=tmp_path / "classes.safetensors")
    teacher.save(paths.teacher)
    student.save(paths.student, teacher=teacher.identity())
    cv.save(paths.classes)
    return SimpleNamespace(teacher=teacher, student=student, cv=cv, names=CLASSNAMES, paths=paths, tmp=tmp_path)


@pytest.fixture
def image_folder(tmp_path):
    """Three readable images of different modes and sizes, and one corrupt file."""
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 48), (200, 30, 30)).save(folder / "red.png")
    Image.new("L", (64, 32), 128).save(folder / "gray.jpg")
    Image.new("RGBA", (33, 33), (0, 0, 255, 128)).save(folder / "sub" / "blue.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return folder
