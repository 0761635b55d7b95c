"""The baseline of every distillation: the student's own zero-shot CLIP and the teacher, scored on the
test split before training, shown next to the distilled student, with a warning when it got worse."""

import json
import logging

import pytest
import torch
import torch.nn.functional as F
from distill_helpers import make_models, text_class_vectors, tiny_student, write_images

import promptkd.stages.distill as distill_mod
from promptkd.data.transforms import transforms_for
from promptkd.engine import TrainConfig
from promptkd.metrics import encode_items
from promptkd.stages.distill import baseline_table, below_baseline, distill_models


def _top1(feats, labels, vectors):
    return 100.0 * ((feats @ vectors.T).argmax(-1) == labels).float().mean().item()


def test_baseline_is_the_zero_shot_student_and_the_teacher_and_leaves_training_unchanged(tmp_path, tiny_configs):
    teacher, student = make_models(tiny_configs)
    items, names = write_images(tmp_path / "images")
    cv = text_class_vectors(teacher, names)
    cfg = TrainConfig(epochs=2, batch_size=8, lr=0.05, warmup_epochs=0, progress=False)
    res = distill_models(teacher, student, cv, items, tmp_path / "a", test_items=items, train=cfg)
    baseline = json.loads((tmp_path / "a" / "metrics.json").read_text())["baseline"]

    # independently: the student CLIP's own text features for "a photo of a {}." and its plain image tower
    clip = student.clip
    with torch.no_grad():
        text = F.normalize(clip.model.encode_text(clip.tokenizer([f"a photo of a {n}." for n in names])), dim=-1)
    feats, labels = encode_items(clip.model.encode_image, items, transforms_for(clip.preprocess_cfg)[1], progress=False)
    assert baseline["student_zero_shot"]["accuracy"] == pytest.approx(_top1(feats, labels, text))
    t_feats, _ = encode_items(teacher.encode_images, items, transforms_for(teacher.clip.preprocess_cfg)[1],
                              progress=False)
    assert baseline["teacher"]["accuracy"] == pytest.approx(_top1(t_feats, labels, cv.vectors))
    assert res.metrics["baseline"] == baseline

    # the extra passes do not touch the training: the same student without them
    other = tiny_student(tiny_configs[1], teacher.dim)
    distill_models(teacher, other, cv, items, tmp_path / "b", test_items=items, train=cfg, baseline=False)
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["baseline"] is None
    for k, v in student.trainable_tensors().items():
        assert torch.equal(v, other.trainable_tensors()[k]), k


def test_a_student_that_ends_below_its_zero_shot_baseline_is_warned_about(tmp_path, tiny_configs, monkeypatch,
                                                                           caplog):
    teacher, student = make_models(tiny_configs)
    items, names = write_images(tmp_path / "images")
    perfect = {"student_zero_shot": {"accuracy": 100.0}, "teacher": {"accuracy": 100.0}}
    monkeypatch.setattr(distill_mod, "measure_baseline", lambda *a, **k: perfect)
    cfg = TrainConfig(epochs=1, batch_size=8, warmup_epochs=0, progress=False)
    with caplog.at_level(logging.WARNING, logger="promptkd"):
        res = distill_models(teacher, student, text_class_vectors(teacher, names), items, tmp_path / "run",
                             test_items=items, train=cfg, kd_weight=3.0)
    assert res.metrics["results"]["last"]["accuracy"] < 100.0
    assert any("below its own zero-shot baseline (accuracy 100.00)" in r.message for r in caplog.records)
    assert "kd-weight (now 3)" in baseline_table(res.metrics).splitlines()[-1]


def _metrics(zero_shot, last, teacher=80.0):
    return {"kd_weight": 1000.0,
            "baseline": {"student_zero_shot": {"base": 50.0, "novel": 40.0, "hm": zero_shot},
                         "teacher": {"base": 80.0, "novel": 80.0, "hm": teacher}},
            "results": {"last": {"epoch": 10, "base": 60.0, "novel": 50.0, "hm": last}}}


def test_table_rows_and_the_warning_line():
    fine = baseline_table(_metrics(44.4, 54.5))
    lines = fine.splitlines()
    assert lines[0].split() == ["base", "novel", "HM"]
    assert [ln.split("  ")[0].strip() for ln in lines[1:]] == ["student zero-shot", "teacher",
                                                                "distilled student (last epoch)"]
    assert lines[3].split()[-1] == "54.50" and below_baseline(_metrics(44.4, 54.5)) is None
    worse = baseline_table(_metrics(60.0, 54.5))
    assert worse.splitlines()[-1].startswith("WARNING: the distilled student (HM 54.50) is below its own zero-shot "
                                             "baseline (HM 60.00)")
    no_baseline = {**_metrics(0, 54.5), "baseline": None}
    assert baseline_table(no_baseline).count("\n") == 1 and below_baseline(no_baseline) is None


def test_no_baseline_option_turns_the_passes_off():
    from promptkd.cli import build_parser

    args = build_parser().parse_args(["distill", "--out", "run", "--no-baseline"])
    assert distill_mod.config_from_args(args).baseline is False
    assert distill_mod.config_from_args(build_parser().parse_args(["distill", "--out", "run"])).baseline is True
