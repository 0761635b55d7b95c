"""No labels anywhere, and several teachers: a plain CLIP as teacher (class vectors from templates,
a cache, distillation, eval), unlabelled images with a class-name file, and two teachers at once.
Every command runs as a user types it, on tiny CLIPs named by files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import openai_checkpoint
from tinyclip import one_line, write_images

from promptkd.artifacts import read_artifact_meta
from promptkd.cli import main
from promptkd.templates import CLIP_IMAGENET_TEMPLATES

NAMES = ["red", "green", "blue", "yellow"]


@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory) -> tuple[Path, Path]:
    """A folder of images without labels (nested, as a user's photos are) and a class-name file."""
    root = tmp_path_factory.mktemp("unlabelled")
    write_images(root / "photos", 3, seed=7)
    names = root / "names.txt"
    names.write_text("\n".join(NAMES) + "\n")
    return root / "photos", names


def _teacher(clips) -> list[str]:
    return ["--teacher-model", str(clips.teacher_cfg), "--teacher-weights", str(clips.teacher_weights)]


def _student(clips) -> list[str]:
    return ["--student-model", str(clips.student_cfg), "--student-weights", str(clips.student_weights),
            "--vision-depth", "2", "--n-ctx-vision", "2", "--epochs", "1", "--batch-size", "4"]


def _fails(argv, capsys) -> str:
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    return one_line(err)


def test_plain_clip_teacher_without_any_label(clips, unlabelled, tmp_path, capsys):
    """class-vectors, cache and distill with a plain CLIP, an images: folder and a names file; the
    distill run records the teacher, replays it from the cache folder alone, and resumes unchanged."""
    photos, names = unlabelled
    cv, cache, run = tmp_path / "cv.safetensors", tmp_path / "cache", tmp_path / "student"
    assert main(["-q", "class-vectors", *_teacher(clips), "--classes-file", str(names), "--templates", "imagenet80",
                 "--device", "cpu", "--out", str(cv)]) == 0
    made_by = read_artifact_meta(cv, "class_vectors")["teacher"]
    assert made_by["templates"] == list(CLIP_IMAGENET_TEMPLATES) and made_by["clip"]["sha256"]
    assert main(["-q", "cache", *_teacher(clips), "--dataset", f"images:{photos}", "--protocol", "cross",
                 "--views", "2", "--device", "cpu", "--no-progress", "--out", str(cache)]) == 0
    # the teacher comes from the cache's record, its templates from the class vectors
    assert main(["-q", "distill", "--teacher-cache", str(cache), "--class-vectors", str(cv), "--dataset",
                 f"images:{photos}", "--protocol", "cross", *_student(clips), "--projector-init", "text",
                 "--device", "cpu", "--no-progress", "--out", str(run)]) == 0
    record = json.loads((run / "run.json").read_text())
    inputs = record["inputs"]
    assert record["status"] == "finished" and inputs["teacher"] is None
    assert inputs["teacher_templates"] == list(CLIP_IMAGENET_TEMPLATES)
    assert inputs["teacher_clip"]["weights"]["sha256"] == made_by["clip"]["sha256"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["teacher"]["templates"] == list(CLIP_IMAGENET_TEMPLATES) and metrics["results"] == {}
    assert (run / "student.safetensors").is_file()
    # the same without class vectors: names from the file, vectors from the plain teacher
    assert main(["-q", "distill", *_teacher(clips), "--classes-file", str(names), "--dataset", f"images:{photos}",
                 "--protocol", "cross", *_student(clips), "--device", "cpu", "--no-progress",
                 "--out", str(tmp_path / "student2")]) == 0
    written = read_artifact_meta(tmp_path / "student2" / "class_vectors.safetensors", "class_vectors")
    assert written["classnames"] == NAMES and written["teacher"]["templates"] == ["a photo of a {}."]
    # the same CLIP with other templates is another teacher at deployment too, unless the user says so
    predict = ["-q", "predict", str(photos), "--student", str(tmp_path / "student2"), "--class-vectors", str(cv),
               "--device", "cpu", "--no-progress"]
    err = _fails(predict, capsys)
    assert "templates" in err and "--allow-other-teacher" in err
    assert main([*predict, "--allow-other-teacher"]) == 0


def test_distill_takes_class_vectors_from_a_run_folder(clips, unlabelled, tmp_path):
    """--class-vectors DIR (a run folder holding class_vectors.safetensors) is the file in it, as in
    eval and predict: the run trains on those vectors and run.json records the file."""
    photos, names = unlabelled
    made = tmp_path / "made"
    common = ["-q", "distill", *_teacher(clips), "--dataset", f"images:{photos}", "--protocol", "cross",
              *_student(clips), "--device", "cpu", "--no-progress"]
    assert main([*common, "--classes-file", str(names), "--out", str(made)]) == 0
    assert main([*common, "--class-vectors", str(made), "--out", str(tmp_path / "again")]) == 0
    record = json.loads((tmp_path / "again" / "run.json").read_text())["inputs"]["class_vectors"]
    assert record["path"] == str((made / "class_vectors.safetensors").resolve())
    assert read_artifact_meta(tmp_path / "again" / "class_vectors.safetensors", "class_vectors")["classnames"] == NAMES


def test_class_vectors_of_another_plain_clip_are_refused(clips, unlabelled, data, tmp_path, capsys):
    photos, names = unlabelled
    cv = tmp_path / "cv.safetensors"
    assert main(["-q", "class-vectors", *_teacher(clips), "--classes-file", str(names), "--device", "cpu",
                 "--out", str(cv)]) == 0
    other = openai_checkpoint(clips.teacher_cfg, tmp_path / "other-teacher.pt", 99)  # same model, other weights
    common = ["-q", "distill", "--class-vectors", str(cv), "--dataset", f"images:{photos}", "--protocol", "cross",
              *_student(clips), "--device", "cpu", "--no-progress"]
    err = _fails([*common, "--teacher-model", str(clips.teacher_cfg), "--teacher-weights", str(other),
                  "--out", str(tmp_path / "a")], capsys)
    assert "come from another teacher" in err and "clip" in err
    err = _fails([*common, *_teacher(clips), "--templates", "imagenet80", "--out", str(tmp_path / "b")], capsys)
    assert "another teacher" in err and "templates" in err
    err = _fails(["-q", "eval", "--teacher-model", str(clips.teacher_cfg), "--teacher-weights", str(other),
                  "--class-vectors", str(cv), "--dataset", f"folder:{data}", "--protocol", "cross"], capsys)
    assert "another teacher" in err


def test_unlabelled_images_name_the_way_forward(clips, unlabelled, tmp_path, capsys):
    photos, names = unlabelled
    out = tmp_path / "teacher"
    err = _fails(["teacher", *_teacher(clips), "--dataset", f"images:{photos}", "--out", str(out)], capsys)
    assert "plain CLIP" in err and not out.exists()
    err = _fails(["-q", "distill", *_teacher(clips), "--classes-file", str(names), "--dataset", f"images:{photos}",
                  *_student(clips), "--device", "cpu", "--out", str(tmp_path / "s")], capsys)
    assert "--protocol cross" in err
    err = _fails(["-q", "class-vectors", *_teacher(clips), "--dataset", f"images:{photos}", "--out",
                  str(tmp_path / "cv.safetensors")], capsys)
    assert "--classes-file" in err
    err = _fails(["-q", "distill", "--dataset", f"images:{photos}", "--out", str(tmp_path / "s2")], capsys)
    assert "--teacher-model" in err


def test_eval_of_a_plain_clip_teacher_with_templates(clips, data, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["-q", "eval", *_teacher(clips), "--templates", "imagenet80", "--dataset", f"folder:{data}",
                 "--protocol", "cross", "--no-progress", "--out", str(out)]) == 0
    model = json.loads(out.read_text())["model"]["plain_clip_teacher"]
    assert model["templates"] == list(CLIP_IMAGENET_TEMPLATES)
    assert main(["-q", "eval", "--clip-model", str(clips.teacher_cfg), "--clip-weights", str(clips.teacher_weights),
                 "--templates", "imagenet80", "--dataset", f"folder:{data}", "--protocol", "cross", "--no-progress",
                 "--out", str(tmp_path / "clip.json")]) == 0
    # the same CLIP, classifier and images: the same accuracy either way
    a = json.loads(out.read_text())["results"]["accuracy"]
    assert json.loads((tmp_path / "clip.json").read_text())["results"]["accuracy"] == pytest.approx(a, abs=1e-9)
    # a student of a plain CLIP teacher: its run folder alone is enough to evaluate it
    run = tmp_path / "student"
    assert main(["-q", "distill", *_teacher(clips), "--templates", "imagenet80", "--dataset", f"folder:{data}",
                 "--protocol", "cross", *_student(clips), "--device", "cpu", "--no-progress", "--out", str(run)]) == 0
    assert main(["-q", "eval", str(run), "--no-progress", "--out", str(tmp_path / "student.json")]) == 0
    scored = json.loads((tmp_path / "student.json").read_text())
    assert scored["dataset"].endswith("colours") and "accuracy" in scored["results"]


def test_two_teachers_a_promptsrc_artifact_and_a_plain_clip(clips, data, runs, tmp_path, capsys):
    run = tmp_path / "student"
    assert main(["-q", "distill", "--teacher", str(runs.teacher), "--add-teacher",
                 f"teacher_model={clips.teacher_cfg},teacher_weights={clips.teacher_weights},templates=imagenet80",
                 "--ensemble", "confidence", "--ensemble-weights", "2,1", "--dataset", f"folder:{data}",
                 "--protocol", "cross", *_student(clips), "--device", "cpu", "--no-progress", "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "teacher 2" in out and "teachers combined" in out
    inputs = json.loads((run / "run.json").read_text())["inputs"]
    assert inputs["teacher"]["path"].endswith("teacher.safetensors")
    assert inputs["more_teachers"][0]["teacher"] is None
    assert inputs["more_teachers"][0]["teacher_templates"] == list(CLIP_IMAGENET_TEMPLATES)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["ensemble"] == "confidence" and metrics["ensemble_weights"] == pytest.approx([2 / 3, 1 / 3])
    assert len(metrics["teachers"]) == 2 and "accuracy" in metrics["baseline"]["ensemble"]
    # a further teacher with other class names is refused before training
    cv = tmp_path / "cv.safetensors"
    assert main(["-q", "class-vectors", *_teacher(clips), "--classes", "a,b,c,d", "--out", str(cv)]) == 0
    err = _fails(["-q", "distill", "--teacher", str(runs.teacher), "--add-teacher",
                  f"teacher_model={clips.teacher_cfg},teacher_weights={clips.teacher_weights},class_vectors={cv}",
                  "--dataset", f"folder:{data}", "--protocol", "cross", *_student(clips), "--device", "cpu",
                  "--out", str(tmp_path / "s2")], capsys)
    assert "same class names" in err


def test_eval_of_a_plain_clip_teacher_with_class_vectors_from_a_run_folder(clips, data, tmp_path, capsys):
    """--class-vectors RUNDIR (a folder holding class_vectors.safetensors) scores as the file itself."""
    run = tmp_path / "run"
    run.mkdir()
    cv = run / "class_vectors.safetensors"
    assert main(["-q", "class-vectors", *_teacher(clips), "--dataset", f"folder:{data}", "--device", "cpu",
                 "--out", str(cv)]) == 0
    scored = {}
    for name, given in (("folder", run), ("file", cv)):
        capsys.readouterr()
        assert main(["-q", "eval", *_teacher(clips), "--class-vectors", str(given), "--dataset", f"folder:{data}",
                     "--protocol", "cross", "--no-progress", "--out", str(tmp_path / f"{name}.json")]) == 0
        printed = capsys.readouterr().out
        scored[name] = json.loads((tmp_path / f"{name}.json").read_text())
        assert f"{scored[name]['results']['accuracy']:.2f}" in printed
    assert scored["folder"]["results"] == scored["file"]["results"] and scored["folder"]["images"]["accuracy"] == 8
    assert scored["folder"]["model"] == scored["file"]["model"]
    assert scored["folder"]["model"]["plain_clip_teacher"]["templates"] == ["a photo of a {}."]
    # the class vectors are an input: --out may not replace them, named through the folder or not
    before = cv.read_bytes()
    for given in (run, cv):
        err = _fails(["-q", "eval", *_teacher(clips), "--class-vectors", str(given), "--dataset", f"folder:{data}",
                      "--protocol", "cross", "--no-progress", "--out", str(cv)], capsys)
        assert "class vectors" in err
    assert cv.read_bytes() == before
