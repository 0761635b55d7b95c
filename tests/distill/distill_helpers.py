"""Helpers for the distillation tests: tiny teacher/student CLIPs and tiny PNG datasets."""

from __future__ import annotations

import json

import torch
from tinyclip import write_images  # noqa: F401  (re-exported for the distillation tests)

from promptkd.models import load_clip
from promptkd.models.wrappers import ClassVectors, Student, Teacher


def tiny_teacher(config_path) -> Teacher:
    torch.manual_seed(0)
    return Teacher(load_clip(str(config_path)), vision_depth=2, text_depth=2, n_ctx_vision=2, n_ctx_text=2).eval()


def tiny_student(config_path, teacher_dim: int, seed: int = 1) -> Student:
    torch.manual_seed(seed)  # prompts and projector; the random CLIP tower comes from init_seed
    return Student(load_clip(str(config_path), init_seed=seed), teacher_dim, vision_depth=2, n_ctx_vision=2)


def text_class_vectors(teacher: Teacher, names: list[str]) -> ClassVectors:
    with torch.no_grad():
        return ClassVectors(teacher.encode_classnames(names).detach(), names, teacher.identity())


def write_split_file(tmp_path, per_class: int) -> tuple[str, list[str]]:
    """A split_zhou-style file over the 4 colour classes: 4 train, 1 val and the rest test images per
    class; returns ("split:FILE", class names)."""
    items, names = write_images(tmp_path / "img", per_class=per_class)
    entry = [[str(p).split("img/")[1], y, names[y]] for p, y in items]
    per = {y: [e for e in entry if e[1] == y] for y in range(4)}
    split = {"train": [e for y in per for e in per[y][:4]], "val": [per[y][4] for y in per],
             "test": [e for y in per for e in per[y][5:]]}
    path = tmp_path / "img" / "split.json"
    path.write_text(json.dumps(split))
    return f"split:{path}", names


def write_json(path, obj):
    path.write_text(json.dumps(obj))
    return path


def make_models(tiny_configs) -> tuple[Teacher, Student]:
    t, s = tiny_configs
    teacher = tiny_teacher(t)
    return teacher, tiny_student(s, teacher.dim)
