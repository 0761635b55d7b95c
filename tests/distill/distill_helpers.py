"""Helpers for the distillation tests: tiny teacher/student CLIPs and tiny PNG datasets."""

from __future__ import annotations

import json
import socket

import numpy as np
import torch
from PIL import Image

from promptkd.data.dataset import Item
from promptkd.models import load_clip
from promptkd.models.wrappers import ClassVectors, Student, Teacher

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def write_images(root, per_class: int = 6, seed: int = 0, size: int = 32) -> tuple[list[Item], list[str]]:
    """Coloured 32x32 squares with noise and a random darker patch, one folder per class."""
    rng = np.random.default_rng(seed)
    items = []
    for label, (name, rgb) in enumerate(COLOURS.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            a = np.clip(np.array(rgb) + rng.normal(0, 20, (size, size, 3)), 0, 255)
            y, x = rng.integers(0, size // 2, 2)
            a[y : y + size // 3, x : x + size // 3] *= 0.5
            path = folder / f"{i}.png"
            Image.fromarray(a.astype(np.uint8)).save(path)
            items.append(Item(str(path), label))
    return items, list(COLOURS)


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
