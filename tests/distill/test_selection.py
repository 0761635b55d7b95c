"""Which student the distillation results report: `best_val` is the test score of the epoch with the
best validation accuracy (first on ties), measured on that epoch's saved student;
`official_best_on_test` is the epoch with the best (base) test accuracy, its novel accuracy and
their HM.

The validation scores and the per-epoch test scores are replaced by crafted tables (the
selection logic is under test, not the tiny models), while the final test scores are real:
recomputed here with plain loops from the saved students, and the student each final evaluation
ran is identified by its features of a fixed probe batch.
"""

import math

import pytest
import torch
from distill_helpers import text_class_vectors, tiny_teacher, write_split_file
from PIL import Image
from tinyclip import hm, plain_top1

import promptkd.metrics as metrics_mod
import promptkd.stages.distill as distill_mod
from promptkd.artifacts import load_artifact
from promptkd.data.protocols import build_protocol
from promptkd.data.transforms import transforms_for
from promptkd.engine import TrainConfig
from promptkd.models import load_clip
from promptkd.models.wrappers import Student

VAL = [40.0, 90.0, 60.0, 90.0]  # epoch 2 is the best on val; epoch 4 ties it and must not replace it
TEST = [(50.0, 70.0), (75.0, 20.0), (60.0, 95.0), (75.0, 90.0)]  # (base, novel): epoch 2 first reaches 75


@pytest.fixture
def split_file(tmp_path):
    """A split_zhou-style file over 4 colour classes: 4 train, 1 val and 3 test images per class."""
    return write_split_file(tmp_path, per_class=8)


def _clip(s_cfg):
    return load_clip(str(s_cfg))  # random weights from load_clip's own seed: the same CLIP every time


def _student(s_cfg, dim):
    torch.manual_seed(1)  # the same prompts and projector every time
    return Student(_clip(s_cfg), dim, vision_depth=2, n_ctx_vision=2)


PROBE = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def _crafted_scores(monkeypatch, epochs):
    """Replace the val score of each epoch and the test scores of each epoch; the final test
    evaluations stay real, and record which student they ran (its features of PROBE)."""
    real = metrics_mod.evaluate_splits  # distillation imports it from promptkd.metrics when it runs
    calls = {"val": 0, "test": 0, "final": []}

    def scoring(encode, classifier, splits, *args, **kwargs):
        out = real(encode, classifier, splits, *args, **kwargs)
        if set(splits) == {"val"}:
            out["val"] = VAL[calls["val"]]
            calls["val"] += 1
        elif calls["test"] < epochs:  # during training: official_best_on_test's per-epoch scores
            out.update(zip(("base", "novel"), TEST[calls["test"]]))
            calls["test"] += 1
        else:
            with torch.no_grad():
                calls["final"].append(encode(PROBE).float())
        return out

    monkeypatch.setattr(metrics_mod, "evaluate_splits", scoring)
    return calls


def _plain_accuracy(student, items, vectors) -> float:
    """Top-1 (%) of `student` on `items` (labels index `vectors`' rows), in plain loops."""
    tf = transforms_for(student.clip.preprocess_cfg)[1]
    student.eval()
    with torch.no_grad():
        feats = [student(tf(Image.open(item.path).convert("RGB"))[None])[0].tolist() for item in items]
    return plain_top1(feats, [item.label for item in items], vectors.tolist(), list(range(len(vectors))))


def test_best_val_and_official_best_on_test_select_their_epochs(split_file, tiny_configs, tmp_path, monkeypatch):
    name, names = split_file
    t_cfg, s_cfg = tiny_configs
    teacher = tiny_teacher(t_cfg)
    cv = text_class_vectors(teacher, names)
    protocol = build_protocol("base2novel", name)
    calls = _crafted_scores(monkeypatch, epochs=4)
    cfg = TrainConfig(epochs=4, batch_size=4, lr=0.5, warmup_epochs=0, progress=False)
    res = distill_mod.distill_models(teacher, _student(s_cfg, teacher.dim), cv, protocol.train, tmp_path / "run",
                                     protocol=protocol, train=cfg, kd_weight=1000.0, official_best_on_test=True,
                                     baseline=False)  # the baseline passes would take crafted scores
    final = calls.pop("final")
    assert calls == {"val": 4, "test": 4} and len(final) == 2  # the last student, then the best-val one
    results, history = res.metrics["results"], res.metrics["history"]
    assert [h["val"] for h in history] == VAL
    assert [(h["test_base"], h["test_novel"]) for h in history] == TEST

    # official_best_on_test: the first epoch with the highest base test accuracy, and its novel/HM.
    best = max(range(4), key=lambda e: (TEST[e][0], -e))
    base, novel = TEST[best]
    official = results["official_best_on_test"]
    assert (official["epoch"], official["base"], official["novel"]) == (best + 1, base, novel) == (2, 75.0, 20.0)
    assert official["hm"] == pytest.approx(hm(base, novel))

    # best_val: the first epoch with the highest val accuracy, scored on test with that epoch's student.
    chosen = max(range(4), key=lambda e: (VAL[e], -e)) + 1
    assert chosen == 2 and results["best_val"]["epoch"] == chosen and results["best_val"]["val"] == 90.0
    _, meta = load_artifact(tmp_path / "run" / "student-best-val.safetensors", kind="student")
    assert meta["epoch"] == chosen
    m = math.ceil(len(names) / 2)  # base classes: the first ceil(n/2)

    def load(path):
        return Student.load(path, clip=_clip(s_cfg)).eval()

    def plain_scores(student):
        return {"base": _plain_accuracy(student, protocol.test["base"].items, cv.vectors[:m]),
                "novel": _plain_accuracy(student, protocol.test["novel"].items, cv.vectors[m:])}

    best_student, last_student = load(tmp_path / "run" / "student-best-val.safetensors"), load(res.student_path)
    with torch.no_grad():
        best_probe, last_probe = best_student(PROBE), last_student(PROBE)
    assert not torch.allclose(best_probe, last_probe, atol=1e-3)  # epoch 2's student is not the last one
    torch.testing.assert_close(final[0], last_probe)  # "last" was scored with the last student ...
    torch.testing.assert_close(final[1], best_probe)  # ... and "best_val" with epoch 2's saved student
    want, last_scores = plain_scores(best_student), plain_scores(last_student)
    assert results["last"]["base"] == pytest.approx(last_scores["base"], abs=1e-4)
    assert results["last"]["novel"] == pytest.approx(last_scores["novel"], abs=1e-4)
    assert results["best_val"]["base"] == pytest.approx(want["base"], abs=1e-4)
    assert results["best_val"]["novel"] == pytest.approx(want["novel"], abs=1e-4)
    assert results["best_val"]["hm"] == pytest.approx(hm(want["base"], want["novel"]))
