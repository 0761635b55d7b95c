"""StudentClassifier from Python: load, predict on PIL images or tensors, swap classes."""

import pytest
import torch
from PIL import Image

from promptkd.deploy import StudentClassifier
from promptkd.errors import PromptKDError
from promptkd.models.wrappers import ClassVectors


def test_three_line_usage_matches_student_and_class_vectors(tiny_kd):
    clf = StudentClassifier.load(tiny_kd.paths.student, tiny_kd.paths.classes, clip=tiny_kd.student.clip)
    imgs = [Image.new("RGB", (40, 48), (200, 30, 30)), Image.new("L", (64, 32), 90)]
    preds = clf.predict(imgs, topk=3)

    assert len(preds) == 2 and all(len(p) == 3 for p in preds)
    for p in preds:
        assert all(name in tiny_kd.names for name, _ in p)
        probs = [v for _, v in p]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6

    x = clf.preprocess(imgs)
    assert x.shape == (2, 3, 32, 32)
    s = tiny_kd.student.eval()  # BatchNorm in the projector: compare in eval mode
    expected = s.logit_scale * s(x) @ tiny_kd.cv.vectors.T
    torch.testing.assert_close(clf(x), expected)
    assert clf.predict(x, topk=3) == preds  # tensors are taken as already normalised
    # One image alone is not bit-equal to it within a batch of two: BLAS blocks a 1-row and a 2-row
    # matmul differently, so fp32 sums run in another order (issue #23 saw 0.9516592 vs 0.9516591 on
    # one CPU of a kind where others agree exactly). Features of norm ~1 then differ by a few ulp
    # per layer, well below 1e-6 in a cosine; logits (scale x cosine) by below 1e-6 * scale, and a
    # softmax probability by at most a quarter of that (dp = p(1-p) dz). prob_tol bounds this.
    prob_tol = 1e-6 * float(s.logit_scale)
    [[alone]], (top, second) = clf.predict(x[0], topk=1), preds[0][:2]
    assert top[1] - second[1] > 2 * prob_tol  # the top class is clear, so rounding cannot reorder it
    assert alone[0] == top[0] and alone[1] == pytest.approx(top[1], abs=prob_tol, rel=0)


def test_with_classes_uses_the_teacher_text_tower(tiny_kd):
    clf = StudentClassifier(tiny_kd.student, tiny_kd.cv)
    new = clf.with_classes(["zebra", "horse"], tiny_kd.teacher)
    assert new.classnames == ["zebra", "horse"] and clf.classnames == tiny_kd.names
    x = torch.randn(2, 3, 32, 32)
    w = tiny_kd.teacher.encode_classnames(["zebra", "horse"])
    torch.testing.assert_close(new(x), tiny_kd.student.logit_scale * tiny_kd.student(x) @ w.T)


def test_class_vector_dim_mismatch_says_what_differs(tiny_kd):
    bad = ClassVectors(torch.nn.functional.normalize(torch.randn(4, 7), dim=-1), tiny_kd.names, {})
    with pytest.raises(PromptKDError, match="dim 7.*projects to dim 32"):
        StudentClassifier(tiny_kd.student, bad)
    bad.save(tiny_kd.tmp / "bad.safetensors")
    with pytest.raises(PromptKDError, match="dim 7.*dim 32"):
        StudentClassifier.load(tiny_kd.paths.student, tiny_kd.tmp / "bad.safetensors", clip=tiny_kd.student.clip)


def test_wrong_image_size_is_an_error(tiny_kd):
    clf = StudentClassifier(tiny_kd.student, tiny_kd.cv)
    with pytest.raises(PromptKDError, match="3x32x32"):
        clf.predict(torch.zeros(1, 3, 64, 64))
