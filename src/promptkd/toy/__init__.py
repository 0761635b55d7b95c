"""The embedded toy world and its two tiny CLIPs (teacher and student), for demos and tests.

``world``: a seeded, file-free image-caption world with a shifted 24-class domain.
``models``: ``build_toy_clip("toy-teacher" | "toy-student")`` -> standard open_clip models
with the shipped weights. ``pretrain``: the script that made those weights.
Names are resolved on first use, so that the CLI can list the toy commands without torch.
"""

from __future__ import annotations

from promptkd.lazy import lazy_attributes

TOY_MODELS = ("toy-teacher", "toy-student")  # the shipped tiny CLIPs (assets/toy/NAME.json, .safetensors)

_LAZY = {"World": "promptkd.toy.world", "build_toy_clip": "promptkd.toy.models",
         "toy_model_names": "promptkd.toy.models"}

__all__ = ["World", "build_toy_clip", "toy_model_names"]
__getattr__ = lazy_attributes(__name__, _LAZY)
