"""The embedded toy world and its two tiny CLIPs (teacher and student), for demos and tests.

``world``: a seeded, file-free image-caption world with a shifted 24-class domain.
``models``: ``build_toy_clip("toy-teacher" | "toy-student")`` -> standard open_clip models
with the shipped weights. ``pretrain``: the script that made those weights.
"""

from promptkd.toy.models import build_toy_clip, toy_model_names
from promptkd.toy.world import World

__all__ = ["World", "build_toy_clip", "toy_model_names"]
