"""Sharing a student: `promptkd.load` on every kind of student, the Hub-style model folder and its
card, the image-side export for open vocabulary, and the refusal of another teacher's class vectors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

import promptkd
from promptkd import sharing
from promptkd.cli import main
from promptkd.errors import PromptKDError
from promptkd.models.wrappers import ClassVectors

# predict() rounds nothing; the ONNX graphs differ from PyTorch by float32 rounding of the same
# operations (export's parity check allows 1e-4 x logit scale on logits), so probabilities, which
# softmax keeps within the logit difference, are compared to 1e-4.
ONNX_PROB_TOL = 1e-4


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory):
    """The student run exported in every format (one export per format for the whole module)."""
    out = tmp_path_factory.mktemp("exported")
    files = {"folder": out / "model", "safetensors": out / "one.safetensors", "onnx": out / "model.onnx",
             "image-features": out / "features.onnx"}
    for fmt, path in files.items():
        assert main(["-q", "export", str(runs.student), "--format", fmt, "--out", str(path)]) == 0
    return files


@pytest.fixture(scope="module")
def images():
    return [Image.new("RGB", (40, 48), (200, 30, 30)), Image.new("RGB", (36, 36), (20, 180, 40)),
            Image.new("L", (64, 32), 90)]


def _same_predictions(got, want, tol: float = 0.0):
    assert [[c for c, _ in row] for row in got] == [[c for c, _ in row] for row in want]
    for g, w in zip(got, want):
        assert [p for _, p in g] == pytest.approx([p for _, p in w], abs=tol)


def test_load_takes_every_kind_of_student(runs, exported, images):
    reference = promptkd.load(runs.student)
    want = reference.predict(images, topk=3)
    assert reference.classes == ["blue", "green", "red", "yellow"]
    for given, tol in ((runs.student / "student.safetensors", 0.0), (exported["folder"], 0.0),
                       (exported["safetensors"], 0.0), (exported["onnx"], ONNX_PROB_TOL),
                       (exported["image-features"], ONNX_PROB_TOL)):
        clf = promptkd.load(given)
        assert clf.classes == reference.classes, given
        _same_predictions(clf.predict(images, topk=3), want, tol)
        assert clf.preprocess(images).shape == (3, 3, 32, 32)
    from promptkd.deploy import StudentClassifier

    _same_predictions(StudentClassifier.load(runs.student).predict(images, topk=3), want)  # a run folder too


def test_image_features_score_against_the_class_vectors(runs, exported, images):
    """image_features are unit vectors in the teacher's space: logit_scale * f @ vectors.T are the logits."""
    cv = ClassVectors.load(runs.student / "class_vectors.safetensors")
    scale = json.loads((exported["folder"] / "config.json").read_text())["logit_scale"]
    for given in (runs.student, exported["folder"], exported["image-features"]):
        clf = promptkd.load(given)
        f = clf.image_features(images)
        assert f.shape == (3, cv.dim)
        torch.testing.assert_close(f.norm(dim=-1), torch.ones(3), atol=1e-5, rtol=0)
        logits = clf.logits(clf.preprocess(images))
        torch.testing.assert_close(logits, scale * f @ cv.vectors.T, atol=1e-4 * scale, rtol=0)
    with pytest.raises(PromptKDError, match="image-features"):
        promptkd.load(exported["onnx"]).image_features(images)


def test_import_promptkd_imports_no_torch():
    done = subprocess.run([sys.executable, "-c", "import sys, promptkd; print(callable(promptkd.load), "
                           "'torch' in sys.modules)"], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["True", "False"], done.stderr


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


def test_model_folder_card_holds_the_runs_metrics(runs, exported):
    folder = exported["folder"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(sharing.FOLDER_FILES)
    metrics = json.loads((runs.student / "metrics.json").read_text())
    card = (folder / "README.md").read_text()
    front = _front_matter(card)
    assert front["library_name"] == "promptkd" and front["pipeline_tag"] == "image-classification"
    assert metrics["dataset"].startswith("folder:") and "datasets" not in front  # a local folder is no Hub dataset
    assert front["model-index"][0]["results"][0]["dataset"]["name"] == "custom"
    reported = {m["name"]: m["value"] for m in front["model-index"][0]["results"][0]["metrics"]}
    want = {"student CLIP, zero-shot: accuracy": metrics["baseline"]["student_zero_shot"]["accuracy"],
            "teacher (class vectors): accuracy": metrics["baseline"]["teacher"]["accuracy"],
            "this student (distilled, last epoch): accuracy": metrics["results"]["last"]["accuracy"]}
    assert reported == want
    config = json.loads((folder / "config.json").read_text())
    assert (folder / "classes.txt").read_text().splitlines() == promptkd.load(runs.student).classes
    assert config["teacher"]["prompts_hash"] in card and config["teacher"]["clip"]["model"] in card
    assert 'promptkd.load("hf-hub:ORG/NAME")' in card and "## Licence" in card
    assert f"export {runs.student} --format folder --out {folder}" in card  # the command that made it
    record = json.loads((runs.student / "run.json").read_text())
    assert record["command_line"] in card


def test_hub_names_load_through_huggingface_hub(exported, images, monkeypatch):
    """Offline: snapshot_download is replaced by a local folder (the download itself needs the Hub)."""
    import huggingface_hub

    asked = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None):
        asked.append((repo_id, revision, sorted(allow_patterns)))
        return str(exported["folder"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    clf = promptkd.load("hf-hub:someone/pets-student", revision="v1")
    assert asked == [("someone/pets-student", "v1", sorted(sharing.FOLDER_FILES))]
    _same_predictions(clf.predict(images), promptkd.load(exported["folder"]).predict(images))
    with pytest.raises(PromptKDError, match="hf-hub:ORG/NAME"):
        promptkd.load("hf-hub:no-slash")


def test_a_changed_class_list_is_refused(exported, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(exported["folder"], folder)
    (folder / "classes.txt").write_text("a\nb\nc\nd\n")
    with pytest.raises(PromptKDError, match="classes.txt"):
        promptkd.load(folder)


def _other_teachers_vectors(runs, path: Path) -> Path:
    """The run's class vectors, labelled as made by a teacher with other prompts (same CLIP)."""
    cv = ClassVectors.load(runs.student / "class_vectors.safetensors")
    ClassVectors(cv.vectors, cv.classnames, {**cv.teacher, "prompts_hash": "0123456789abcdef"}).save(path)
    return path


def test_other_teachers_class_vectors_are_refused_unless_allowed(runs, tmp_path, capsys, data):
    other = _other_teachers_vectors(runs, tmp_path / "other.safetensors")
    photos = data / "test" / "red"
    out = tmp_path / "x.safetensors"
    for argv in (["predict", str(photos), "--student", str(runs.student), "--class-vectors", str(other)],
                 ["export", str(runs.student), "--class-vectors", str(other), "--format", "safetensors",
                  "--out", str(out)]):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "another teacher" in err and "--allow-other-teacher" in err
        assert not out.exists()
        assert main(["-q", *argv, "--allow-other-teacher"]) == 0
    assert promptkd.load(out).classes == ["blue", "green", "red", "yellow"]  # the file says it was allowed
    with pytest.raises(PromptKDError, match="another teacher"):
        promptkd.load(runs.student, class_vectors=other)


def test_image_features_export_with_another_teachers_class_vectors_loads_as_made(runs, tmp_path, capsys, data):
    """--allow-other-teacher at export is recorded in the image-features ONNX: promptkd.load and
    predict --model use its class vectors (and others of that teacher) without the option again."""
    other = _other_teachers_vectors(runs, tmp_path / "other.safetensors")
    out = tmp_path / "features.onnx"
    photos = data / "test" / "red"
    export = ["export", str(runs.student), "--class-vectors", str(other), "--format", "image-features",
              "--out", str(out)]
    capsys.readouterr()
    assert main(export) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "another teacher" in err and "--allow-other-teacher" in err
    assert not out.exists() and not list(tmp_path.glob("features*"))
    assert main(["-q", *export, "--allow-other-teacher"]) == 0
    clf = promptkd.load(out)
    assert clf.classes == ["blue", "green", "red", "yellow"]
    want = promptkd.load(runs.student, class_vectors=other, allow_other_teacher=True)
    images = [Image.open(p) for p in sorted(photos.iterdir())]
    _same_predictions(clf.predict(images, topk=4), want.predict(images, topk=4), ONNX_PROB_TOL)
    assert promptkd.load(out, class_vectors=other).classes == clf.classes  # the same teacher's file, given
    capsys.readouterr()
    assert main(["-q", "predict", str(photos), "--model", str(out), "--json", "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out)["predictions"]
    assert len(printed) == len(images) and printed[0]["top"][0]["class"] in clf.classes
    # the allowance is for that teacher: a third teacher's vectors are still refused
    third = tmp_path / "third.safetensors"
    cv = ClassVectors.load(other)
    ClassVectors(cv.vectors, cv.classnames, {**cv.teacher, "prompts_hash": "fedcba9876543210"}).save(third)
    with pytest.raises(PromptKDError, match="another teacher"):
        promptkd.load(out, class_vectors=third)
    assert promptkd.load(out, class_vectors=third, allow_other_teacher=True).classes == clf.classes


def test_new_class_vectors_pair_with_the_image_side_export(runs, exported, tmp_path, images):
    """Open vocabulary without re-exporting: class vectors of the same teacher for a subset of classes."""
    cv = ClassVectors.load(runs.student / "class_vectors.safetensors")
    subset = tmp_path / "two.safetensors"
    ClassVectors(cv.vectors[[2, 0]], ["red", "blue"], cv.teacher).save(subset)
    full = promptkd.load(exported["image-features"])
    two = promptkd.load(exported["image-features"], class_vectors=subset)
    assert two.classes == ["red", "blue"]
    x = full.preprocess(images)
    torch.testing.assert_close(two.logits(x), full.logits(x)[:, [2, 0]])
    folder_two = promptkd.load(exported["folder"], class_vectors=subset)
    torch.testing.assert_close(folder_two.logits(x), two.logits(x), atol=1e-3, rtol=0)


def test_card_of_a_base_to_novel_run_on_open_clip_weights():
    """A paper-style run: base, novel and HM rows, Hub ids of the open_clip weights as base models."""
    config = {"num_classes": 37, "dataset": "OxfordPets", "protocol": "base2novel",
              "student": {"clip": {"model": "ViT-B-16", "pretrained": "openai"}},
              "teacher": {"clip": {"model": "ViT-L-14", "pretrained": "openai"}, "prompts_hash": "ab12"}}
    metrics = {"baseline": {"student_zero_shot": {"base": 70.1, "novel": 72.3, "hm": 71.18},
                            "teacher": {"base": 95.0, "novel": 97.2, "hm": 96.09}},
               "results": {"last": {"epoch": 20, "base": 92.5, "novel": 96.8, "hm": 94.6},
                           "best_val": {"epoch": 12, "val": 90.0, "base": 92.0, "novel": 96.0, "hm": 93.96}}}
    front = _front_matter(sharing.model_card(config, metrics))
    assert front["base_model"] == ["timm/vit_base_patch16_clip_224.openai", "timm/vit_large_patch14_clip_224.openai"]
    assert front["datasets"] == ["OxfordPets"]
    got = {m["name"]: (m["type"], m["value"]) for m in front["model-index"][0]["results"][0]["metrics"]}
    assert got["this student (distilled, last epoch): hm"] == ("harmonic_mean", 94.6)
    assert got["teacher (class vectors): novel"] == ("accuracy", 97.2)
    assert len(got) == 9  # three rows of base, novel, HM; the best-val epoch is not the exported student
    best = _front_matter(sharing.model_card({**config, "selected_on": "val"}, metrics))
    names = {m["name"] for m in best["model-index"][0]["results"][0]["metrics"]}
    assert "this student (distilled, best validation epoch): hm" in names
