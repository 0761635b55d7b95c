"""Issue #23: an output never clobbers an input or another command's run, also with --overwrite;
inputs are read as the user meant them (a BOM, names cut at the token limit, one class, `1e-3`)."""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

import pytest
from cli_helpers import distill_command, teacher_command
from tinyclip import one_line, write_images

from promptkd.cli import build_parser, main


def _digests(*folders: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in folders for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".promptkd.lock"}


def _refused(argv, capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    return one_line(err)


@pytest.fixture
def copies(runs, tmp_path):
    """Copies of the session's teacher and student run folders, which a test may try to damage."""
    return shutil.copytree(runs.teacher, tmp_path / "tcopy"), shutil.copytree(runs.student, tmp_path / "scopy")


def test_no_accident_with_out_changes_a_finished_file(clips, data, runs, copies, tmp_path, capsys):
    """Every accident of the issue (and its relatives) is one line, exit 2, and every finished file
    keeps its sha256."""
    t, s = copies
    before = _digests(t, s)
    cv = ["-q", "class-vectors", str(t), "--classes", "red circle,blue square", "--overwrite", "--out"]
    accidents = {
        "class vectors over the teacher": ([*cv, str(t / "teacher.safetensors")], f"is the teacher {t}"),
        "class vectors over a teacher run's checkpoint": (
            [*cv, str(t / "checkpoint.safetensors")],
            "is a file of the teacher run (made by `promptkd teacher`)"),
        "class vectors over a student run's class vectors": (
            [*cv, str(s / "class_vectors.safetensors")], "is a file of the distillation run"),
        "distill into its teacher's folder": ([*distill_command(clips, data, t, t), "--overwrite"],
                                              "contains the teacher"),
        "distill with class vectors from its own --out": (
            [*distill_command(clips, data, t, s), "--class-vectors", str(s / "class_vectors.safetensors"),
             "--overwrite"], "contains the class vectors"),
        "teacher over a distillation run": ([*teacher_command(clips, data, s), "--overwrite"],
                                            f"--overwrite: {s} holds a distillation run (made by `promptkd distill`), "
                                            "not a teacher run"),
        "cache over a distillation run": (
            ["-q", "cache", "--teacher", str(t), "--dataset", f"folder:{data}", "--out", str(s), "--overwrite"],
            "holds a distillation run (made by `promptkd distill`), not a teacher cache"),
        "distill --resume in a teacher run": (
            [*distill_command(clips, data, runs.teacher, t), "--resume"],
            f"--resume: {t} holds a teacher run (made by `promptkd teacher`), not a distillation run"),
        "export over the student": (["-q", "export", str(s), "--out", str(s / "student.safetensors"), "--overwrite"],
                                    "is the student"),
        "export over the class vectors": (["-q", "export", str(s), "--out", str(s / "class_vectors.safetensors"),
                                           "--overwrite"], "is the class vectors"),
        "export over the checkpoint": (["-q", "export", str(s), "--out", str(s / "checkpoint.safetensors"),
                                        "--overwrite"], "is a file of the distillation run"),
        "eval metrics over the student": (["-q", "eval", str(s), "--out", str(s / "student.safetensors")],
                                          "is the student"),
        "report into a run it reads": (["-q", "report", str(s), "--out", str(s)], "is the run folder"),
        "teacher inside its image folder": (teacher_command(clips, data, data / "train" / "run"),
                                            "lies inside the image folder"),
    }
    for name, (argv, expected) in accidents.items():
        err = _refused(argv, capsys)
        assert expected in err, (name, err)
    assert _digests(t, s) == before
    assert not (data / "train" / "run").exists()  # a refused run leaves no folder among the classes


def test_a_bom_in_a_class_file_is_not_part_of_the_first_name(runs, tmp_path, capsys):
    from promptkd.models.wrappers import ClassVectors

    names = tmp_path / "classes.txt"
    names.write_bytes("red circle\nblue square\n".encode("utf-8-sig"))  # as Windows Notepad saves it
    assert main(["-q", "class-vectors", str(runs.teacher), "--classes-file", str(names), "--out",
                 str(tmp_path / "cv.safetensors")]) == 0
    assert ClassVectors.load(tmp_path / "cv.safetensors").classnames == ["red circle", "blue square"]


def test_names_cut_at_the_token_limit_are_named_once(runs, tmp_path, capsys, caplog):
    """The tiny CLIPs' text context is 16 tokens (CLIP: 77): two long names that differ only at the
    end become one text and one vector; one warning names them."""
    from promptkd.models.wrappers import ClassVectors

    long_a, long_b = "a very " * 20 + "red circle", "a very " * 20 + "blue square"
    with caplog.at_level(logging.WARNING, logger="promptkd"):
        assert main(["-q", "class-vectors", str(runs.teacher), "--classes", f"green,{long_a},{long_b}", "--out",
                     str(tmp_path / "cv.safetensors")]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("2 class name(s) cut at the text tower's 16-token limit:")
    assert "a very red circle'" in warnings[0] and "a very blue square'" in warnings[0]
    assert "these become identical (one vector for several classes)" in warnings[0] and "'green'" not in warnings[0]
    cv = ClassVectors.load(tmp_path / "cv.safetensors")
    assert (cv.vectors[1] == cv.vectors[2]).all() and not (cv.vectors[0] == cv.vectors[1]).all()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="promptkd"):
        assert main(["-q", "class-vectors", str(runs.teacher), "--classes", "green,red", "--out",
                     str(tmp_path / "short.safetensors")]) == 0
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_a_one_class_dataset_is_refused_for_training(clips, runs, tmp_path, capsys):
    one = tmp_path / "one"
    write_images(one / "train", 3, seed=0)
    for extra in ("green", "blue", "yellow"):
        shutil.rmtree(one / "train" / extra)
    err = _refused(teacher_command(clips, one, tmp_path / "t"), capsys)
    assert "1 base classes ('red'); training needs at least two" in err, err
    err = _refused(distill_command(clips, one, runs.teacher, tmp_path / "s"), capsys)
    assert "1 classes ('red'); training needs at least two" in err, err
    assert not (tmp_path / "t" / "teacher.safetensors").exists() and not (tmp_path / "s" / "student.safetensors").exists()


def test_1e_3_is_a_number_in_set_and_yaml(clips, data, tmp_path):
    from promptkd.stages.distill import config_from_args as distill_config
    from promptkd.stages.teacher import config_from_args as teacher_config

    preset = tmp_path / "lr.yaml"
    preset.write_text("train:\n  lr: 2e-3\n  weight_decay: 5E-4\n")
    parser = build_parser()
    args = parser.parse_args(teacher_command(clips, data, tmp_path / "t", "--set", "train.lr=1e-3"))
    assert teacher_config(args).train.lr == 0.001
    args = parser.parse_args(distill_command(clips, data, tmp_path / "t", tmp_path / "s", "--config", str(preset)))
    cfg = distill_config(args)
    assert (cfg.train.lr, cfg.train.weight_decay) == (0.002, 0.0005)
    args = parser.parse_args(distill_command(clips, data, tmp_path / "t", tmp_path / "s", "--set", "train.lr=3e-2"))
    assert distill_config(args).train.lr == 0.03


def test_the_same_run_twice_gives_bit_identical_weights(clips, data, runs, tmp_path):
    """What holds on one machine (and what a resume relies on): the same command twice gives the same
    bits. Across machines only a tolerance holds (README: the demo's spread on machines of one kind)."""
    from safetensors.torch import load_file

    assert main(distill_command(clips, data, runs.teacher, tmp_path / "again")) == 0
    for name in ("student.safetensors", "class_vectors.safetensors", "checkpoint.safetensors"):
        a, b = load_file(str(runs.student / name)), load_file(str(tmp_path / "again" / name))
        assert set(a) == set(b) and all(a[k].equal(b[k]) for k in a), name
