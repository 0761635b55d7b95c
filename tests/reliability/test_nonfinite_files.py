"""A NaN or inf in a file, or in what a model computes, never becomes a printed score: loads refuse the
tensor by name, `export` fails its parity check, `predict` and `eval` refuse in one line (exit 2)."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from tinyclip import write_images

from promptkd.artifacts import load_artifact, save_artifact
from promptkd.cli import main
from promptkd.data.dataset import Item
from promptkd.data.transforms import TestTransform
from promptkd.deploy import OnnxClassifier
from promptkd.errors import PromptKDError
from promptkd.metrics import encode_items
from promptkd.models import load_clip
from promptkd.models.wrappers import ClassVectors, Student, Teacher

CLASSES = ["blue", "green", "red", "yellow"]  # the world's folder classes, in the dataset's order


def overwrite_tensor(path: Path, name: str, value: float) -> None:
    """Overwrite the bytes of one fp32 tensor in a safetensors file in place (a damaged disk block)."""
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    start, end = json.loads(data[8 : 8 + n])[name]["data_offsets"]
    data[8 + n + start : 8 + n + end] = struct.pack("<f", value) * ((end - start) // 4)
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def files(world, tmp_path_factory):
    d = tmp_path_factory.mktemp("nonfinite")
    teacher = Teacher.load(world.teacher, clip=load_clip(str(world.teacher_cfg), str(world.teacher_weights)))
    torch.manual_seed(1)
    student = Student(load_clip(str(world.student_cfg), str(world.student_weights)), teacher.dim, 2, 2)
    student.save(d / "student.safetensors", teacher=teacher.identity())
    with torch.no_grad():
        ClassVectors(teacher.encode_classnames(CLASSES), CLASSES, teacher.identity()).save(d / "classes.safetensors")
    # The case: a few hundred bytes of the student file overwritten, projector.bn.bias now NaN.
    shutil.copy(d / "student.safetensors", d / "broken.safetensors")
    overwrite_tensor(d / "broken.safetensors", "projector.bn.bias", float("nan"))
    # Finite fp32 weights beyond fp16's range (65504): an fp16 ONNX export holds inf and computes NaN.
    t, meta = load_artifact(d / "student.safetensors")
    t["projector.fc2.weight"][:, 0] = 1e5
    save_artifact(d / "overflow.safetensors", t, meta)
    write_images(d / "images", per_class=1)
    return d


def _student_args(world):
    return ["--student-model", str(world.student_cfg), "--student-weights", str(world.student_weights)]


def _one_line_error(capsys, code):
    out, err = capsys.readouterr()
    assert code == 2 and err.strip().count("\n") == 0, err
    assert "nan" not in out.lower()
    return err


def test_student_with_a_nan_bias_is_refused_by_predict_eval_and_export(world, files, capsys):
    broken, classes = str(files / "broken.safetensors"), str(files / "classes.safetensors")
    assert main(["predict", str(files / "images"), "--student", str(files / "student.safetensors"),
                 "--class-vectors", classes, *_student_args(world)]) == 0  # the undamaged file works
    capsys.readouterr()
    runs = {
        "predict": ["predict", str(files / "images"), "--student", broken, "--class-vectors", classes,
                    *_student_args(world)],
        "eval": ["eval", "--dataset", f"folder:{world.data}", "--protocol", "cross", "--student", broken,
                 "--class-vectors", classes, "--student-model", str(world.student_cfg), "--student-weights",
                 str(world.student_weights), "--device", "cpu", "--no-progress"],
        "export onnx": ["export", "--student", broken, "--class-vectors", classes, *_student_args(world),
                        "--out", str(files / "b.onnx")],
        "export safetensors": ["export", "--format", "safetensors", "--student", broken, "--class-vectors", classes,
                               *_student_args(world), "--out", str(files / "b.safetensors")],
    }
    for what, argv in runs.items():
        err = _one_line_error(capsys, main(argv))
        assert "broken.safetensors: tensor 'projector.bn.bias' holds 32 non-finite value(s)" in err, (what, err)
    assert not (files / "b.onnx").exists() and not (files / "b.safetensors").exists()


def test_export_fails_when_the_exported_model_computes_non_finite_logits(world, files, capsys):
    out = files / "m16.onnx"
    out.write_bytes(b"an older export")
    argv = ["export", "--fp16", "--student", str(files / "overflow.safetensors"), "--class-vectors",
            str(files / "classes.safetensors"), *_student_args(world), "--out", str(out), "--overwrite"]
    err = _one_line_error(capsys, main(argv))  # asked to replace the older export, and refused to
    assert "m16.onnx: parity check failed: the exported model: non-finite scores" in err and "nothing written" in err
    assert out.read_bytes() == b"an older export" and not list(files.glob(".m16.onnx*"))

    # Written anyway (--no-check), the file cannot print a NaN probability either.
    assert main([*argv, "--no-check"]) == 0
    capsys.readouterr()
    err = _one_line_error(capsys, main(["predict", str(files / "images"), "--model", str(out)]))
    assert "m16.onnx: non-finite scores (NaN or inf) for 4 of 4 image(s)" in err
    with pytest.raises(PromptKDError, match="non-finite scores"):
        OnnxClassifier(out).predict(torch.zeros(1, 3, 32, 32))


def test_eval_refuses_non_finite_features_naming_the_first_image(files):
    items = [Item(str(p), i) for i, p in enumerate(sorted((files / "images").rglob("*.png")))]

    def encode(x):  # a model whose output is inf for the one image of the second batch
        f = torch.ones(len(x), 4)
        if len(x) == 1:
            f[0, 2] = float("inf")
        return f

    with pytest.raises(PromptKDError, match=rf"eval: the model gave non-finite features .* for 1 image\(s\) "
                                            rf"\(first: {items[3].path}\)"):
        encode_items(encode, items, TestTransform(32), batch_size=3, progress=False)


def test_teacher_and_checkpoint_with_a_nan_tensor_are_refused_naming_it(world, tmp_path, capsys):
    teacher = tmp_path / "teacher.safetensors"
    shutil.copy(world.teacher, teacher)
    overwrite_tensor(teacher, "vision.deep.1", float("inf"))
    code = main(["class-vectors", "--teacher", str(teacher), "--teacher-model", str(world.teacher_cfg),
                 "--teacher-weights", str(world.teacher_weights), "--classes", "a,b", "--out", str(tmp_path / "cv")])
    err = _one_line_error(capsys, code)
    assert "teacher.safetensors: tensor 'vision.deep.1' holds 96 non-finite value(s)" in err  # 2 tokens x 48

    run = tmp_path / "run"
    assert main(world.distill_args(run, "--epochs", "1", "--no-val")) == 0
    overwrite_tensor(run / "checkpoint.safetensors", "model.projector.fc2.bias", float("nan"))
    err = _one_line_error(capsys, main(world.distill_args(run, "--epochs", "1", "--no-val", "--resume")))
    assert "checkpoint.safetensors: tensor 'model.projector.fc2.bias' holds" in err
