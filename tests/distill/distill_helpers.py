"""Helpers for the distillation tests: tiny teacher/student CLIPs and tiny PNG datasets."""

from __future__ import annotations

import json
import socket

import torch
from tinyclip import write_images  # noqa: F401  (re-exported for the distillation tests)

from promptkd.models import load_clip
from promptkd.models.wrappers import ClassVectors, Student, Teacher


def tiny_teacher(config_path) -> Teacher:
    torch.manual_seed(0)
    return Teacher(load_clip(str(config_path)), vision_depth=2, text_depth=2, n_ctx_vision=2, n_ctx_text=2).eval()


def tiny_student(config_path, teacher_dim: int, seed: int = 1) -> Student:
    torch.manual_seed(seed)
    return Student(load_clip(str(config_path)), teacher_dim, vision_depth=2, n_ctx_vision=2)


def text_class_vectors(teacher: Teacher, names: list[str]) -> ClassVectors:
    with torch.no_grad():
        return ClassVectors(teacher.encode_classnames(names).detach(), names, teacher.identity())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_json(path, obj):
    path.write_text(json.dumps(obj))
    return path


def make_models(tiny_configs) -> tuple[Teacher, Student]:
    t, s = tiny_configs
    teacher = tiny_teacher(t)
    return teacher, tiny_student(s, teacher.dim)
