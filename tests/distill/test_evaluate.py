"""Protocols and `promptkd eval`: base/novel scored apart, val for selection, DG class mapping."""

import json

import pytest
import torch
from distill_helpers import make_models, text_class_vectors, write_images, write_split_file

from promptkd.cli import main
from promptkd.data.protocols import align_class_vectors, build_protocol
from promptkd.engine import TrainConfig
from promptkd.models.wrappers import ClassVectors
from promptkd.stages.distill import distill_models


@pytest.fixture
def split_file(tmp_path):
    """A split_zhou-style file over 4 colour classes: 4 train, 1 val and 2 test images per class."""
    return write_split_file(tmp_path, per_class=7)


def test_base2novel_protocol_scores_base_and_novel_apart(split_file):
    name, names = split_file
    p = build_protocol("base2novel", name)
    assert p.classnames == names and len(p.train) == 16
    assert [it.label for it in p.val["val"].items] == [0, 1]  # val of base classes only
    assert p.test["base"].classes == slice(0, 2) and p.test["novel"].classes == slice(2, None)
    assert sorted({it.label for it in p.test["novel"].items}) == [0, 1]  # relabelled 0..n-m-1


def test_eval_zero_shot_clip_prints_base_novel_hm(split_file, tiny_configs, tmp_path, capsys):
    name, _ = split_file
    out = tmp_path / "zs.json"
    assert main(["eval", "--clip-model", str(tiny_configs[1]), "--dataset", name, "--no-progress", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["results"]) == {"base", "novel", "hm"} and res["images"] == {"base": 4, "novel": 4}
    assert res["model"]["templates"] == ["a photo of a {}."]
    assert "HM" in capsys.readouterr().out
    assert main(["eval", "--clip-model", str(tiny_configs[1]), "--dataset", name, "--split", "val", "--no-progress",
                 "--out", str(out)]) == 0
    assert set(json.loads(out.read_text())["results"]) == {"val"}


def test_distill_base2novel_selects_on_val_and_reports_last(split_file, tmp_path, tiny_configs):
    teacher, student = make_models(tiny_configs)
    name, names = split_file
    p = build_protocol("base2novel", name)
    cfg = TrainConfig(epochs=2, batch_size=8, warmup_epochs=0, progress=False)
    res = distill_models(teacher, student, text_class_vectors(teacher, names), p.train, tmp_path / "run",
                         protocol=p, train=cfg)
    results = res.metrics["results"]
    assert set(results["last"]) == {"epoch", "base", "novel", "hm"}
    assert results["best_val"]["epoch"] in (1, 2) and "official_best_on_test" not in results
    assert all("val" in h and not any(k.startswith("test") for k in h) for h in res.metrics["history"])


def test_class_vectors_for_other_classes_are_refused_by_eval(split_file, tiny_configs, tmp_path, capsys):
    teacher, student = make_models(tiny_configs)
    name, _ = split_file
    student.save(tmp_path / "student.safetensors")
    text_class_vectors(teacher, ["red", "green", "cyan", "yellow"]).save(tmp_path / "cv.safetensors")
    code = main(["eval", "--student", str(tmp_path / "student.safetensors"), "--student-model",
                 str(tiny_configs[1]), "--class-vectors", str(tmp_path / "cv.safetensors"), "--dataset", name])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "1 missing (first: ['blue'])" in err and "1 not in the dataset (first: ['cyan'])" in err


def test_dg_protocol_maps_variant_classes_into_the_reference_list(tmp_path):
    items, _ = write_images(tmp_path / "variant", per_class=1)
    for colour in ("green", "yellow"):  # the variant has only 2 of the 4 classes
        for f in (tmp_path / "variant" / colour).iterdir():
            f.unlink()
        (tmp_path / "variant" / colour).rmdir()
    reference = ["green", "red", "yellow", "blue"]
    p = build_protocol("dg", f"folder:{tmp_path / 'variant'}", reference_classnames=reference)
    assert p.classnames == ["blue", "red"] and p.class_indices == [3, 1]
    assert len(p.train) == len(p.test["accuracy"].items) == 2 and not p.val  # transductive, no val
    cv = ClassVectors(torch.eye(4), reference, {})
    assert torch.equal(align_class_vectors(cv, p), torch.eye(4)[[3, 1]])


def test_eval_of_a_val_split_that_does_not_exist_is_one_line(tmp_path, tiny_configs, capsys):
    """A plain folder (one sub-folder per class) has no val images: say so, instead of an empty table."""
    write_images(tmp_path / "flat", per_class=2)
    code = main(["eval", "--clip-model", str(tiny_configs[1]), "--dataset", f"folder:{tmp_path / 'flat'}",
                 "--split", "val", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    err = captured.err.strip()
    assert err.count("\n") == 0 and "no labelled val images" in err and "--split test" in err, err


def test_progress_bars_stay_off_when_stderr_is_not_a_terminal(split_file, tiny_configs, tmp_path):
    """In a log file or a pipe, a progress bar's carriage-return redraws are noise: none are written."""
    import subprocess
    import sys

    name, _ = split_file
    done = subprocess.run([sys.executable, "-m", "promptkd.cli", "eval", "--clip-model", str(tiny_configs[1]),
                           "--dataset", name, "--batch-size", "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr and "eval base" not in done.stderr
