"""Size of a deployed student: the ONNX export against the one-file safetensors student, fp32 and fp16.

    python benchmarks/deploy_size.py                   # toy student: files measured; ViT-B/16: computed
    python benchmarks/deploy_size.py --measure-paper   # also export the ViT-B/16 student (about 1 GB of files)

Sizes do not depend on the weights' values, so the students have random prompts and projectors
(and random CLIP weights for ViT-B/16: no download). "computed" is the sum of the tensors' bytes
(4 per fp32 / 2 per fp16 value, 8 per int64), from the parameter counts of the student's image
tower, prompts, projector and class vectors; a file adds its header (and ONNX its graph).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

import torch

from promptkd.deploy import StudentClassifier
from promptkd.errors import PromptKDError
from promptkd.models import load_clip
from promptkd.models.wrappers import ClassVectors, Student
from promptkd.stages.export import export_onnx, export_safetensors

# name -> (student CLIP, teacher dim, vision prompt depth, prompt tokens, classes)
STUDENTS = {"toy": ("toy-student", None, 3, 4, None), "ViT-B/16": ("ViT-B-16", 768, 9, 4, 1000)}


def build(name: str) -> StudentClassifier:
    model, teacher_dim, depth, n_ctx, n_classes = STUDENTS[name]
    if name == "toy":
        from promptkd.toy.models import toy_model_config
        from promptkd.toy.world import domain_classnames

        teacher_dim, n_classes = toy_model_config("toy-teacher")["embed_dim"], len(domain_classnames())
    try:
        clip = load_clip(model)  # toy: its shipped weights; ViT-B-16: random (sizes only)
    except PromptKDError:  # toy weights not built yet: same architecture, same size
        clip = load_clip(model, "none")
    torch.manual_seed(0)
    student = Student(clip, teacher_dim, min(depth, len(clip.model.visual.transformer.resblocks)), n_ctx)
    vectors = torch.nn.functional.normalize(torch.randn(n_classes, teacher_dim), dim=-1)
    return StudentClassifier(student, ClassVectors(vectors, [f"class {i}" for i in range(n_classes)], {}))


def computed_bytes(clf: StudentClassifier, fp16: bool) -> int:
    return sum(t.numel() * (2 if fp16 and t.is_floating_point() else t.element_size())
               for t in clf.standalone_tensors().values())


def measured_bytes(clf: StudentClassifier, fmt: str, fp16: bool) -> int:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"m.{fmt}"
        (export_onnx if fmt == "onnx" else export_safetensors)(clf, path, fp16=fp16)
        return path.stat().st_size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--measure-paper", action="store_true", help="also write the ViT-B/16 files and measure them")
    args = p.parse_args()
    print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}; torch {torch.__version__}\n")
    print("| student | classes | tensors (M values) | format | fp32 | fp16 | how |")
    print("|---|---|---|---|---|---|---|")
    for name in STUDENTS:
        clf = build(name).eval()
        values = sum(t.numel() for t in clf.standalone_tensors().values()) / 1e6
        n = len(clf.classnames)
        measure = name == "toy" or args.measure_paper
        if measure:
            for fmt, label in (("onnx", "ONNX"), ("safetensors", "one-file safetensors")):
                cells = " | ".join(_mb(measured_bytes(clf, fmt, fp16)) for fp16 in (False, True))
                print(f"| {name} | {n} | {values:.2f} | {label} | {cells} | measured (file size) |")
        cells = " | ".join(_mb(computed_bytes(clf, fp16)) for fp16 in (False, True))
        print(f"| {name} | {n} | {values:.2f} | tensor bytes (either format, without header/graph) | {cells} | "
              "computed from parameter counts |")


def _mb(size: int) -> str:
    return f"{size / 1e6:.2f} MB" if size < 1e8 else f"{size / 1e6:.0f} MB"

if __name__ == "__main__":
    main()
